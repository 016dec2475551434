"""Cross-attention control (Prompt-to-Prompt): processors really act, exact reproduction, token
alignment units, local blend, cached vs recomputed source, session modes."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diffusionx import InvalidInputError
from diffusionx.control import (
    ControlConfig,
    P2PAttnProcessor,
    PromptToPrompt,
    RoundSpec,
    align_words,
    auto_mode,
    controlled_generate,
    make_edit,
    parse_weights,
)
from diffusionx.policies import FixedStrength
from diffusionx.session import EdgeSession

STEPS = 4
PREV = "a red circle on the left"


@pytest.fixture(scope="module")
def edge(untrained_pair):
    return untrained_pair.edge


@pytest.fixture(scope="module")
def previous(edge):
    return edge.generate(PREV, seed=3, steps=STEPS, decode=False)


def _processor_types(unet):
    return {type(p) for p in unet.attn_processors.values()}


# ----- the processors act, and only for the run ---------------------------------------------
def test_processors_are_installed_act_and_are_removed(edge, previous):
    seen = {}

    class Spy(PromptToPrompt):
        def on_step(self, step_index, num_steps, timestep):
            seen.setdefault("types", _processor_types(edge.unet))
            super().on_step(step_index, num_steps, timestep)

    import diffusionx.control.controller as controller_module

    original = controller_module.PromptToPrompt
    controller_module.PromptToPrompt = Spy
    try:
        out = controlled_generate(edge, "a blue star on the left", RoundSpec(PREV, seed=3), steps=STEPS, decode=False)
    finally:
        controller_module.PromptToPrompt = original
    assert seen["types"] == {P2PAttnProcessor}
    assert _processor_types(edge.unet) == {AttnProcessor2_0}  # restored after the run
    n_layers = len(edge.unet.attn_processors)
    assert out.stats["processor_calls"] >= n_layers * STEPS  # every layer, every step
    assert out.stats["injected_calls"] > 0
    assert out.source_calls == STEPS  # the previous round was replayed beside the edit

    # Not a silent no-op: the controlled edit differs from plain re-generation with the same seed,
    # and from the same run with control switched off (no injection windows, no blend).
    plain = edge.generate("a blue star on the left", seed=3, steps=STEPS, decode=False)
    off = controlled_generate(
        edge, "a blue star on the left", RoundSpec(PREV, seed=3), steps=STEPS, decode=False,
        config=ControlConfig(cross_steps=0, self_steps=0, local_blend=False),
    )
    assert off.stats["injected_calls"] == 0
    torch.testing.assert_close(off.latents, plain.latents, rtol=0, atol=0)  # processors without edit = SDPA
    assert (out.latents - plain.latents).abs().max() > 1e-3


def test_injection_without_blend_changes_the_output(edge):
    spec = RoundSpec(PREV, seed=3)
    no_blend = ControlConfig(local_blend=False)
    cross_only = controlled_generate(
        edge, "a blue star on the left", spec, steps=STEPS, decode=False,
        config=ControlConfig(self_steps=0, local_blend=False),
    )
    both = controlled_generate(edge, "a blue star on the left", spec, steps=STEPS, decode=False, config=no_blend)
    plain = edge.generate("a blue star on the left", seed=3, steps=STEPS, decode=False)
    assert (cross_only.latents - plain.latents).abs().max() > 1e-3
    assert (both.latents - cross_only.latents).abs().max() > 1e-3  # self-attention injection acts too


# ----- exact reproduction -------------------------------------------------------------------
@pytest.mark.parametrize("local_blend", [True, False])
def test_unchanged_prompt_reproduces_the_previous_round_exactly(edge, previous, local_blend):
    out = controlled_generate(
        edge, PREV, RoundSpec(PREV, seed=3), steps=STEPS, decode=False, config=ControlConfig(local_blend=local_blend)
    )
    assert out.edit.kind == "identity" and out.stats["injected_calls"] > 0
    assert torch.equal(out.latents, previous.latents)


def test_unchanged_prompt_reproduces_an_sdedit_round_exactly(edge, previous):
    sdedit = edge.generate("a red circle on the right", seed=5, steps=STEPS, strength=0.5,
                           init_latents=previous.latents, decode=False)
    spec = RoundSpec("a red circle on the right", seed=5, strength=0.5, init_latents=previous.latents)
    out = controlled_generate(edge, "a red circle on the right", spec, steps=STEPS, decode=False)
    assert out.unet_steps == STEPS // 2 and torch.equal(out.latents, sdedit.latents)


def test_cached_trace_equals_recompute_and_chains(edge, previous):
    spec = RoundSpec(PREV, seed=3)
    recorded = controlled_generate(edge, PREV, None, seed=3, steps=STEPS, decode=False, keep_trace=True)
    assert torch.equal(recorded.latents, previous.latents)  # recording changes nothing
    assert recorded.trace is not None and recorded.stats["trace_bytes"] > 0
    recompute = controlled_generate(edge, "a blue star on the left", spec, steps=STEPS, decode=False)
    cached = controlled_generate(
        edge, "a blue star on the left", spec, trace=recorded.trace, steps=STEPS, decode=False, keep_trace=True
    )
    assert cached.source_calls == 0 and recompute.source_calls == STEPS
    assert torch.equal(cached.latents, recompute.latents)
    # A second edit on top of the controlled round: replaying the chain == reading its trace.
    spec2 = RoundSpec("a blue star on the left", seed=3, source=spec, config=ControlConfig())
    chained = controlled_generate(edge, "a green star on the left", spec2, steps=STEPS, decode=False)
    from_trace = controlled_generate(
        edge, "a green star on the left", spec2, trace=cached.trace, steps=STEPS, decode=False
    )
    assert chained.source_calls == 2 * STEPS and from_trace.source_calls == 0
    assert torch.equal(chained.latents, from_trace.latents)
    same = controlled_generate(edge, "a blue star on the left", spec2, steps=STEPS, decode=False)
    assert torch.equal(same.latents, recompute.latents)


# ----- local blend --------------------------------------------------------------------------
def test_local_blend_mask_restricts_the_change(edge, previous):
    config = ControlConfig(blend_threshold=0.99)
    out = controlled_generate(edge, "a blue circle on the left", RoundSpec(PREV, seed=3), steps=STEPS,
                              decode=False, config=config)
    assert out.mask is not None
    mask = out.mask.expand_as(out.latents)
    assert 0 < mask.float().mean() < 0.5
    assert torch.equal(out.latents[~mask], previous.latents[~mask])  # outside: the previous round
    assert (out.latents[mask] - previous.latents[mask]).abs().mean() > 1e-3  # inside: edited


# ----- token alignment ----------------------------------------------------------------------
def test_parse_weights():
    assert parse_weights("a (red:1.5) circle") == ("a red circle", {1: 1.5})
    assert parse_weights("(big red:0.5) star, (blue:2)") == ("big red star, blue", {0: 0.5, 1: 0.5, 4: 2.0})
    assert parse_weights("plain words") == ("plain words", {})
    with pytest.raises(InvalidInputError):
        parse_weights("a (red circle")
    with pytest.raises(InvalidInputError):
        parse_weights("a (red:99) circle")


def test_replace_alignment(edge):
    tok = edge.tokenizer
    edit = make_edit(tok, "a red circle on the left", "a blue circle on the left")
    assert edit.kind == "replace" and edit.changed_words == (["red"], ["blue"])
    assert edit.source_changed == edit.target_changed == [2]
    assert edit.matrix is None and edit.own is None  # one token for one token: the map carries over
    # Different token counts: the target token takes the mean of the source word's tokens.
    long_word = "supercalifragilistic"
    n = len(tok(long_word, add_special_tokens=False).input_ids)
    assert n > 1
    edit = make_edit(tok, f"a {long_word} circle", "a red circle")
    m = edit.matrix
    assert m is not None and torch.allclose(m[2 : 2 + n, 2], torch.full((n,), 1.0 / n))
    assert m[2 + n, 3] == 1.0  # "circle" follows, shifted
    assert m[2 + n + 1, 4] == 1.0  # EOS aligned to EOS
    assert torch.allclose(m.sum(0), torch.ones(m.shape[1]))  # every target column is a convex mix
    with pytest.raises(InvalidInputError):
        make_edit(tok, "a red circle", "a big red circle", mode="replace")


def test_refine_alignment_of_inserted_words(edge):
    tok = edge.tokenizer
    assert align_words(["a", "red", "circle"], ["a", "large", "red", "circle"]) == [
        (0, 0), (None, 1), (1, 2), (2, 3)
    ]
    edit = make_edit(tok, "a red circle", "a large red circle")
    assert edit.kind == "refine" and edit.target_changed == [2] and edit.source_changed == []
    assert edit.own is not None and edit.own.nonzero().flatten().tolist() == [2]  # "large" uses its own map
    m = edit.matrix
    assert m[0, 0] == m[1, 1] == 1.0  # BOS, "a"
    assert m[:, 2].sum() == 0  # the inserted word takes nothing from the source
    assert m[2, 3] == m[3, 4] == 1.0  # "red", "circle" keep their source maps, shifted by one
    assert m[4, 5] == 1.0  # EOS
    removed = make_edit(tok, "a large red circle", "a red circle")
    assert removed.kind == "refine" and removed.source_changed == [2] and removed.own is None
    assert removed.matrix[3, 2] == removed.matrix[4, 3] == 1.0


def test_reweight_scales_the_word_columns(edge):
    edit = make_edit(edge.tokenizer, "a red circle", "a (red:1.5) circle")
    assert edit.kind == "reweight" and edit.weighted == [2]
    diag = edit.matrix.diagonal()
    assert diag[2] == 1.5 and diag[1] == diag[3] == 1.0
    both = make_edit(edge.tokenizer, "a red circle", "a (blue:2) circle")
    assert both.kind == "replace" and both.matrix[2, 2] == 2.0


def test_reweight_changes_the_output(edge, previous):
    out = controlled_generate(edge, "a (red:3) circle on the left", RoundSpec(PREV, seed=3), steps=STEPS,
                              decode=False, config=ControlConfig(local_blend=False))
    assert (out.latents - previous.latents).abs().max() > 1e-3


# ----- session modes ------------------------------------------------------------------------
def test_auto_rule():
    words = {}  # no measured table: the word rule
    assert auto_mode("a red circle", "a red circle", words)[0] == "controlled"
    assert auto_mode("a red circle on the left", "a blue circle on the left", words)[0] == "controlled"
    assert auto_mode("a red circle", "a small red circle", words)[0] == "controlled"
    assert auto_mode("a red circle on the left", "a red circle on the right", words)[0] == "sdedit"
    assert auto_mode("a red circle on the left", "three green hearts over a black sea", words)[0] == "fresh"


def test_auto_mode_follows_the_measured_table_per_edit_kind():
    from diffusionx.control.bench import choose_modes
    from diffusionx.control.rounds import edit_kind

    assert edit_kind("a red circle on the left", "a blue circle on the left") == "change_attribute"
    assert edit_kind("a circle", "a red circle") == "add_detail"
    assert edit_kind("a red circle", "a red circle and a blue star") == "add_object"
    assert edit_kind("a red circle on white", "a red circle on black") == "change_background"
    assert edit_kind("a photo of a cat", "a photo of a dog") is None

    def cell(psnr, right):
        return {"unedited_psnr": psnr, "edited_right": right}

    result = {"by_kind": {
        "change_attribute": {"edits": 8, "fresh": cell(20, 0.6), "sdedit": cell(24, 0.6), "p2p": cell(28, 0.58),
                             "p2p_blend": cell(27, 0.6)},  # control keeps more and still edits: control
        "add_object": {"edits": 8, "fresh": cell(20, 0.6), "sdedit": cell(24, 0.6), "p2p": cell(24.5, 0.3),
                       "p2p_blend": cell(24, 0.3)},  # control keeps no more: SDEdit
        "change_background": {"edits": 8, "fresh": cell(15, 0.9), "sdedit": cell(25, 0.2), "p2p": cell(30, 0.1),
                              "p2p_blend": cell(30, 0.1)},  # neither makes the edit: fresh
        "remove_object": {"edits": 8, "fresh": cell(15, 0.8), "sdedit": cell(22, 0.3), "p2p": cell(24, 0.8),
                          "local": cell(30, 0.8)},  # two controlled methods pay: the one that keeps more
        "reword": {"edits": 0},
    }}
    table = choose_modes(result)
    assert {k: v["mode"] for k, v in table.items()} == {
        "change_attribute": "controlled", "add_object": "sdedit", "change_background": "fresh",
        "remove_object": "local"}
    assert table["change_attribute"]["method"] == "p2p"
    assert auto_mode("a red circle on the left", "a blue circle on the left", table)[0] == "controlled"
    assert auto_mode("a red circle on white", "a red circle on black", table)[0] == "fresh"
    # a measured kind beats the word rules: a move is an attribute change here, not the layout rule's SDEdit
    assert auto_mode("a red circle on the left", "a red circle on the right", table)[0] == "controlled"
    # a kind the table has no row for, or prompts outside the world: the word rule
    assert auto_mode("a red car on the left", "a red car on the right", table)[0] == "sdedit"
    assert auto_mode("a red circle on the left", "a circle on the left", table)[0] == "controlled"  # drop_detail


def test_session_modes(untrained_pair):
    session = EdgeSession(untrained_pair, policy=FixedStrength(edge=0.5), steps=STEPS, seed=3)
    first = session.generate(PREV, mode="auto")
    assert first.mode == "fresh"
    same = session.generate(PREV, mode="controlled")
    assert (same.mode, same.parent, same.strength) == ("controlled", 1, 1.0)
    assert torch.equal(same.latents, first.latents)
    edited = session.generate("a blue circle on the left", mode="controlled")  # auto's choice: its own test
    assert edited.mode == "controlled" and edited.seed == 3
    moved = session.generate("a blue circle on the right", mode="sdedit")
    assert (moved.mode, moved.strength, moved.parent) == ("sdedit", 0.5, 3)
    again = session.generate("a green circle on the right", mode="controlled")  # controlled from an SDEdit round
    assert again.strength == 0.5 and again.unet_steps == STEPS // 2
    fresh = session.generate("a green circle on the right", mode="fresh")
    assert fresh.mode == "fresh" and fresh.parent is None
    with pytest.raises(InvalidInputError):
        session.generate("x", mode="sometimes")

    cached = EdgeSession(untrained_pair, policy=FixedStrength(edge=0.5), steps=STEPS, seed=3, control_cache=True)
    cached.generate(PREV)
    cached.generate(PREV, mode="controlled")
    cached_edit = cached.generate("a blue circle on the left", mode="controlled")
    assert torch.equal(cached_edit.latents, edited.latents)  # cache or replay: the same round


# ----- real architecture --------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_sd_architecture_installs_and_runs():
    """The processors install and run on the real Tiny-SD U-Net (random weights, 64x64 pixels:
    one step) and the unchanged prompt still reproduces the previous round exactly."""
    from diffusionx.engine import Engine
    from diffusionx.models import build_random_sd_side

    engine = Engine(**build_random_sd_side("random-tiny-sd"), name="random-tiny-sd")
    spec = RoundSpec(PREV, seed=1)
    plain = engine.generate(PREV, seed=1, steps=1, height=64, width=64, decode=False)
    same = controlled_generate(engine, PREV, spec, steps=1, height=64, width=64, decode=False)
    assert same.stats["injected_calls"] > 0 and torch.equal(same.latents, plain.latents)
    assert _processor_types(engine.unet) == {AttnProcessor2_0}


# ----- the benchmark command ----------------------------------------------------------------
def test_bench_edits_measures_every_method_and_writes_its_files(tmp_path, untrained_pair):
    import json

    from diffusionx.cli import build_parser
    from diffusionx.control.bench import METHODS, bench_edits, round_edits
    from diffusionx.metrics import default_weights_path

    args = build_parser().parse_args(["bench-edits", "--n", "3", "--out", str(tmp_path)])
    assert args.func.__qualname__ == "diffusionx.control.bench.cmd_bench_edits"
    assert args.n == 3 and args.model == "embedded" and args.cross_steps is None
    validation = round_edits(14, split="validation")
    assert all(e.session.startswith("validation-") for e in validation)  # auto's table comes from other edits
    edits = round_edits(14)
    assert {e.kind for e in edits} == {"add_detail", "drop_detail", "change_attribute", "change_background",
                                       "add_object", "remove_object", "reword"}  # every kind has its share
    if not default_weights_path().exists():
        pytest.skip("the evaluator's weights are not in this checkout")
    result = bench_edits(untrained_pair, n=3, steps=2, out_dir=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "edits.json").read_text())
    assert on_disk["overall"]["edits"] == 3 and len(result["per_edit"]) == 3
    for method in METHODS:
        cell = result["overall"][method]
        assert cell["unedited_psnr"] > 0 and 0 < cell["unedited_ssim"] <= 1
        assert result["cost"][method]["seconds_per_edit"] > 0
    assert "| all | 3 | p2p_blend |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "edits_grid.png").exists()
    # auto is, edit by edit, the method its round mode runs: same scores, that method's cost
    source = {"fresh": "fresh", "sdedit": "sdedit", "controlled": "p2p_blend", "local": "local"}
    for row in result["per_edit"]:
        assert row["methods"]["auto"] == row["methods"][source[row["auto_mode"]]]
    assert set(result["bars_met_by"]) <= {"p2p", "p2p_blend", "local", "p2p_local", "auto"}
    assert result["meets_bars"] == bool(result["bars_met_by"])
    with pytest.raises(ValueError, match="side"):
        bench_edits(untrained_pair, n=1, steps=2, out_dir=tmp_path, side="phone")


def test_unedited_region_and_image_metrics():
    import numpy as np

    from diffusionx.control.bench import RoundEdit, object_box, unedited_mask
    from diffusionx.metrics.image import psnr, ssim
    from diffusionx.world.captions import parse_prompt

    def edit(a, b):
        return RoundEdit("s", 2, "x", a, b, parse_prompt(a), parse_prompt(b))

    color = unedited_mask(edit("a red circle on the left", "a blue circle on the left"))
    x0, y0, x1, y1 = object_box(parse_prompt("a circle on the left").objects[0], 64)
    assert not color[y0:y1, x0:x1].any() and color.sum() == 64 * 64 - (x1 - x0) * (y1 - y0)
    background = unedited_mask(edit("a red circle on the left on white", "a red circle on the left on black"))
    assert background[32, 14] and not background[2, 2]  # inside the object: should stay; the backdrop changes
    assert unedited_mask(edit("a red circle", "a blue circle")) is None  # where the model put it is unknown
    reword = unedited_mask(edit("a red circle on the left", "on the left, a red circle"))
    assert reword.all()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[:, :32] = 255 - b[:, :32]  # change the left half only
    right = np.zeros((64, 64), bool)
    right[:, 40:] = True
    assert psnr(a, b, right) == float("inf") and psnr(a, b) < 10
    assert ssim(a, b, right) == pytest.approx(1.0) and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < 0.7


PLAIN_EDIT_SESSION = {"rounds": [
    "a red circle on the left", "a blue circle on the left",  # a color edit: measured
    "a blue circle", "a blue square",  # no position named: the region is unknown
    "a blue square on the left, white background", "a blue square on the left, black background",  # background
    "a photo of a cat", "a photo of a dog",  # outside the vocabulary: no scenes
]}


def test_bench_edits_on_plain_string_sessions(tmp_path, untrained_pair, capsys):
    import json

    from diffusionx.cli import build_parser, main
    from diffusionx.control.bench import bench_edits, round_edits
    from diffusionx.metrics import default_weights_path
    from diffusionx.world.sessions import normalize_session

    session = normalize_session(PLAIN_EDIT_SESSION)
    edits = round_edits(10, sessions=[session])
    assert [(e.round, e.kind) for e in edits] == [(2, "change_attribute"), (6, "change_background")]
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"rounds": ["a circle", "a square", "a red square"]}) + "\n")
    assert main(["bench-edits", "--sessions", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "no measurable round edits" in capsys.readouterr().err
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(PLAIN_EDIT_SESSION) + "\n")
    assert build_parser().parse_args(["bench-edits", "--sessions", str(path)]).sessions == str(path)
    if not default_weights_path().exists():
        pytest.skip("the evaluator's weights are not in this checkout")
    result = bench_edits(untrained_pair, n=5, steps=2, out_dir=tmp_path / "out", progress=False, sessions=[session])
    rows = result["per_edit"]
    assert [r["round"] for r in rows] == [2, 6]
    # what the prompts leave unsaid (the object's size; round 2's background) is not checked
    assert [r["untouched_checks"] for r in rows] == [0, 3]  # present, shape, color of the square

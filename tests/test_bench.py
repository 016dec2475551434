"""The benchmark harness: methods, latency model, outputs."""

import json

import numpy as np
import pytest

from diffusionx import InvalidInputError
from diffusionx.bench import (
    PROFILES,
    Method,
    default_methods,
    get_profile,
    load_sessions,
    parse_policy,
    run_method,
    session_latency,
)
from diffusionx.bench.harness import SessionRecord
from diffusionx.policies import FixedStrength

CALIB = {
    "edge": {"unet_step_s": 0.1, "text_encode_s": 0.01, "decode_s": 0.02},
    "cloud": {"unet_step_s": 0.3, "text_encode_s": 0.01, "decode_s": 0.02},
}


def test_latency_model_by_hand():
    """Every term of the latency model, checked against arithmetic done by hand."""
    measured, laptop = get_profile("measured"), get_profile("laptop-gpu")
    rounds = [{"strength": 1.0, "unet_steps": 10}, {"strength": 0.5, "unet_steps": 5}]
    dx = Method("dx", "diffusionx", FixedStrength(0.5, 0.3))
    record = SessionRecord(rounds=rounds, final={"unet_steps": 3, "bytes_up": 2000, "bytes_down": 2000})
    lat = session_latency(dx, record, CALIB, measured)
    edge_rounds = [0.01 + 10 * 0.1 + 0.02, 0.01 + 5 * 0.1 + 0.02]
    final = (0.01 + 3 * 0.3) + 0.02  # cloud text + U-Net, then the edge decodes
    assert lat["round_waits_s"] == pytest.approx(edge_rounds)
    assert lat["session_s"] == pytest.approx(sum(edge_rounds) + final)
    assert lat["cloud_unet_measured_s"] == pytest.approx(0.9) and lat["bytes"] == 4000

    modelled = session_latency(dx, record, CALIB, laptop)
    edge_factor = laptop.edge_slowdown / laptop.cloud_speedup
    expected_final = (
        laptop.rtt_s
        + 2000 / laptop.up_bytes_per_s
        + 2000 / laptop.down_bytes_per_s
        + (0.01 + 0.9) / laptop.cloud_speedup
        + 0.02 * edge_factor
    )
    assert modelled["final_wait_s"] == pytest.approx(expected_final)
    assert modelled["round_waits_s"] == pytest.approx([w * edge_factor for w in edge_rounds])

    cloud_rounds = [dict(r, strength=1.0, unet_steps=10, bytes_up=50, bytes_down=5000) for r in rounds]
    cloud = session_latency(Method("c", "cloud-only"), SessionRecord(rounds=cloud_rounds), CALIB, laptop)
    per_round = (0.01 + 10 * 0.3 + 0.02) / laptop.cloud_speedup + laptop.transfer_seconds(50, 5000)
    assert cloud["session_s"] == pytest.approx(2 * per_round) and cloud["bytes"] == 2 * 5050


def test_policies_and_sessions_parse():
    assert parse_policy("fixed-0.4", 0.6).policy == FixedStrength(0.6, 0.4)
    assert parse_policy("fixed-0.7-0.2", 0.6).name == "diffusionx-fixed-0.7-0.2"
    assert parse_policy("fixed", 0.6).policy == FixedStrength(0.6, 0.5)
    for bad in ("magic", "fixed-x", "fixed-1.5", "fixed-0.1-0.2-0.3"):
        with pytest.raises(InvalidInputError):
            parse_policy(bad, 0.6)
    with pytest.raises(InvalidInputError, match="at least 1"):
        load_sessions(None, 0)
    names = [m.name for m in default_methods([0.3, 0.5])]
    assert names[:2] == ["cloud-only", "edge-only"] and "diffusionx-fixed-0.5" in names
    assert set(PROFILES) >= {"measured", "laptop-gpu", "phone-4g"}


def test_bad_session_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"rounds": [{"text": "no prompt key"}]}\n')
    with pytest.raises(InvalidInputError, match="prompt"):
        load_sessions(str(path), 5)


def test_diffusionx_runs_fewer_steps_and_hands_over_latents(untrained_pair):
    sessions, _ = load_sessions(None, 3)
    dx = Method("dx", "diffusionx", FixedStrength(edge=0.5, cloud=0.25))
    records = run_method(dx, untrained_pair, sessions, steps=4, guidance_scale=7.5, batch=8, seed=0)
    for record, session in zip(records, sessions):
        assert [r["unet_steps"] for r in record.rounds] == [4] + [2] * (len(session["rounds"]) - 1)
        assert record.final["unet_steps"] == 1
        assert 2048 < record.final["bytes_down"] < 2300  # 4x16x16 fp16 latents in safetensors
        assert record.final_image.size == (64, 64)


def test_the_benchmark_measures_the_products_own_sessions(untrained_pair):
    """Lock-step batched rounds give what a person's EdgeSession gives, round by round and final."""
    import numpy as np

    from diffusionx.session import EdgeSession

    sessions, _ = load_sessions(None, 3)
    policy = FixedStrength(edge=0.5, cloud=0.25)
    records = run_method(Method("dx", "diffusionx", policy), untrained_pair, sessions, steps=4, guidance_scale=7.5,
                         batch=2, seed=10)
    for i, (record, session) in enumerate(zip(records, sessions)):
        alone = EdgeSession(untrained_pair, policy=policy, steps=4, seed=10 + i)
        for (index, preview), round_ in zip(record.previews, session["rounds"]):
            mine = alone.generate(round_["prompt"])
            assert mine.index == index
            diff = np.abs(np.asarray(mine.image, dtype=int) - np.asarray(preview, dtype=int))
            assert diff.max() <= 2  # batched U-Net calls move float32 sums by ~1e-4, not more
        final = alone.finalize()
        assert (final.strength, final.unet_steps, final.bytes_up) == (
            record.final["strength"], record.final["unet_steps"], record.final["bytes_up"])
        assert np.abs(np.asarray(final.image, dtype=int) - np.asarray(record.final_image, dtype=int)).max() <= 2


@pytest.mark.slow
def test_bench_cli_writes_results(tmp_path):
    from diffusionx.cli import main

    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            "untrained",
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            str(out),
            "--policy",
            "fixed-0.5",
            "--policy",
            "fixed-1-0.5",
            "--profile",
            "phone-4g",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"cloud-only", "edge-only", "diffusionx-fixed-0.5", "diffusionx-fixed-1-0.5"}
    keys = {
        "session_latency_mean_s",
        "session_latency_p95_s",
        "cloud_unet_seconds_per_session",
        "bytes_per_session",
        "clip_score",
        "fid",
        "attribute_accuracy",
    }
    for m in methods.values():
        assert keys <= set(m)
    assert methods["edge-only"]["cloud_unet_seconds_per_session"] == 0
    assert methods["edge-only"]["bytes_per_session"] == 0
    dx = methods["diffusionx-fixed-0.5"]
    assert dx["cloud_unet_seconds_per_session"] < methods["cloud-only"]["cloud_unet_seconds_per_session"]
    assert results["profile"]["name"] == "phone-4g" and results["workload"]["n_sessions"] == 4
    assert {"measured", "modelled"} <= set(results["measured_vs_modelled"])
    # Rounds 2+ on the edge: strength 0.6 runs fewer steps than regenerating from scratch.
    sessions = load_sessions(None, 4)[0]
    scratch = methods["diffusionx-fixed-1-0.5"]
    assert scratch["edge_unet_steps_per_session"] == 3 * sum(len(s["rounds"]) for s in sessions) / 4
    assert dx["edge_unet_steps_per_session"] < scratch["edge_unet_steps_per_session"]
    assert dx["edited_previews"] == scratch["edited_previews"] == sum(len(s["rounds"]) - 1 for s in sessions)
    assert 0 <= dx["edited_preview_attribute_accuracy"] <= 1
    assert methods["edge-only"]["edge_unet_steps_per_session"] == scratch["edge_unet_steps_per_session"]
    assert "edited_previews" not in methods["edge-only"]  # it only generates the finals
    table = (out / "results.md").read_text()
    assert "| diffusionx-fixed-0.5 |" in table and "vs cloud-only" in table
    assert "## Edge previews, rounds 2+" in table and "relative to regenerating every round from scratch" in table
    for name in ("latency_quality.png", "quality_fidelity_latency.png", "per_round_latency.png", "finals_grid.png"):
        assert (out / name).stat().st_size > 1000
    # preview fidelity: only for methods that refine a preview; 4 sessions, values in range
    assert methods["cloud-only"]["preview_fidelity"] is None
    fidelity = dx["preview_fidelity"]
    assert len(fidelity["per_session"]["psnr_db"]) == 4 and fidelity["psnr_db"] > 0
    assert 0 < fidelity["ssim"] <= 1 and 0 <= fidelity["feature_distance"] <= 2
    assert fidelity["attributes_kept"] is None or 0 <= fidelity["attributes_kept"] <= 1
    assert len(fidelity["psnr_db_ci95"]) == 2 and "## Preview fidelity" in table
    assert dx["cloud_strength_mean"] == 0.5 and scratch["cloud_strength_mean"] == 0.5  # the finals' strength
    assert "cloud_strength_mean" not in methods["cloud-only"]
    # each final's CLIP score, paired with cloud-only's for a share with an interval, as attribute accuracy is
    clip = dx["clip_score_vs_cloud_only"]
    assert len(dx["clip_score_per_image"]) == 4 and clip["n"] == 4
    assert clip["ratio"] == pytest.approx(dx["clip_score"] / methods["cloud-only"]["clip_score"])
    assert clip["ci95"][0] <= clip["ci95"][1]
    assert "clip_score_vs_cloud_only" not in methods["cloud-only"] and "CLIP score share" in table


@pytest.mark.slow
def test_arch_mode_times_with_a_calibration_and_skips_quality(tmp_path):
    from diffusionx.cli import main

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(CALIB))
    out = tmp_path / "arch"
    args = [
        "bench",
        "--model",
        "untrained",
        "--n",
        "2",
        "--steps",
        "4",
        "--out",
        str(out),
        "--policy",
        "fixed-0.5",
        "--profile",
        "measured",
        "--arch",
        "sd15",
        "--calibration",
        str(calibration),
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    cloud = results["methods"]["cloud-only"]
    assert cloud["attribute_accuracy"] is None and cloud["quality_note"] == "n/a (random weights)"
    rounds = results["workload"]["rounds_mean"] * 2
    per_round = CALIB["cloud"]["text_encode_s"] + 4 * CALIB["cloud"]["unet_step_s"] + CALIB["cloud"]["decode_s"]
    assert cloud["session_latency_mean_s"] == pytest.approx(rounds / 2 * per_round)
    assert "n/a (random weights)" in (out / "results.md").read_text()


def test_paired_interval_of_preview_quality():
    from diffusionx.bench.report import paired_relative_ci

    rng = np.random.default_rng(0)
    sessions = [s for s in range(40) for _ in range(4)]
    rounds = [r for _ in range(40) for r in range(2, 6)]
    ref_values = list(rng.uniform(0.3, 0.8, len(sessions)))

    def run(values):
        return {"edited_preview_per_image": {"session": sessions, "round": rounds, "attribute_accuracy": values}}

    ref = run(ref_values)
    low, high = paired_relative_ci(run([0.9 * v for v in ref_values]), ref, "attribute_accuracy")
    assert low == pytest.approx(-0.1) and high == pytest.approx(-0.1)  # every pair is 10% lower
    noisy = run([v * 0.95 + rng.normal(0, 0.05) for v in ref_values])
    low, high = paired_relative_ci(noisy, ref, "attribute_accuracy")
    assert low < -0.05 < high and high - low < 0.1
    other = {"edited_preview_per_image": {"session": sessions, "round": [r + 1 for r in rounds],
                                          "attribute_accuracy": ref_values}}
    assert paired_relative_ci(other, ref, "attribute_accuracy") is None  # not the same previews


def test_plot_labels_that_would_collide_are_stacked():
    from diffusionx.bench.report import label_offsets

    # three labels on one row, 100 px wide, anchors 30 px apart: one line down, then one line up
    assert label_offsets([(0, 50), (30, 50), (60, 50)], [100, 100, 100]) == [0, 10, -10]
    # far apart, or on different rows: untouched
    assert label_offsets([(0, 50), (200, 50), (0, 10)], [100, 100, 100]) == [0, 0, 0]
    # a label whose nearest free places are taken moves on past them
    assert label_offsets([(0, 50), (0, 40), (0, 60), (10, 50)], [100] * 4) == [0, 0, 0, 20]


PLAIN_SESSIONS = [
    {"rounds": ["a circle", "a red circle", "a large red circle on a blue background"]},
    {"id": "mine", "rounds": ["heart", {"prompt": "pink heart, black background"}, "Tiny pink heart, upper left."]},
]


def test_plain_string_sessions_load(tmp_path):
    from diffusionx.world import Scene, SceneObject

    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in PLAIN_SESSIONS))
    sessions, workload = load_sessions(str(path), 10)
    assert workload == str(path) and [s["id"] for s in sessions] == ["session-00000", "mine"]
    assert all(set(r) >= {"prompt", "scene", "edit"} for s in sessions for r in s["rounds"])
    tiny_pink = Scene((SceneObject("heart", "pink", "small", "top left"),))
    assert Scene.from_dict(sessions[1]["rounds"][2]["scene"]) == tiny_pink
    assert load_sessions(str(path), 1)[0] == sessions[:1]
    path.write_text('{"rounds": ["a circle", ""]}\n')
    with pytest.raises(InvalidInputError, match="session 0: round 2"):
        load_sessions(str(path), 5)


def test_a_world_split_file_names_its_split(tmp_path):
    from diffusionx.world import generate_sessions, write_jsonl

    path = tmp_path / "validation.jsonl"
    write_jsonl(generate_sessions(3, "validation"), path)
    sessions, workload = load_sessions(str(path), 10)
    assert workload == f"{path}: embedded world, validation split" and len(sessions) == 3


def test_fid_references_complete_partial_finals_from_a_fixed_seed():
    from diffusionx.bench.run import _references
    from diffusionx.world.sessions import normalize_session

    sessions = [normalize_session(s) for s in PLAIN_SESSIONS]
    refs = _references(sessions)
    assert len(refs) == 2 and all(r.shape == (64, 64, 3) for r in refs)
    assert all(np.array_equal(a, b) for a, b in zip(refs, _references(sessions)))  # the same on every run
    blue = np.array([35, 70, 225])
    assert (np.abs(refs[0].astype(int) - blue).sum(-1) < 10).mean() > 0.5  # the named background is kept
    assert not np.array_equal(refs[0], _references([normalize_session({"rounds": ["a circle"]})])[0])
    out_of_vocabulary = normalize_session({"rounds": ["a circle", "a photo of a cat"]})
    assert _references([sessions[0], out_of_vocabulary]) is None  # no scene: no FID


def test_bench_scores_every_round_of_plain_string_sessions(tmp_path, untrained_pair):
    """`diffusionx bench --sessions FILE` on rounds that are plain strings: every preview and
    every final is scored (the prompts parse), and FID has its references."""
    from diffusionx.bench import run_bench

    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in PLAIN_SESSIONS))
    sessions, workload = load_sessions(str(path), 10)
    dx = Method("diffusionx-fixed-0.5", "diffusionx", FixedStrength(edge=0.5, cloud=0.5))
    report = run_bench(untrained_pair, sessions, [dx], get_profile("measured"), tmp_path / "out", workload=workload,
                       steps=2, batch=8, calibration=CALIB)
    m = report["methods"][dx.name]
    assert m["n_unparseable"] == 0 and m["attribute_accuracy"] is not None and m["fid"] is not None
    assert report["workload"]["fid_finals"] == 2
    assert set(m["preview_attribute_accuracy_by_round"]) == {1, 2, 3}
    assert all(v is not None for v in m["preview_attribute_accuracy_by_round"].values())
    per_image = m["edited_preview_per_image"]
    assert len(per_image["attribute_accuracy"]) == 4 and None not in per_image["attribute_accuracy"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["workload"]["n_sessions"] == 2

    # The recorded work models the same latency again, and another calibration moves it
    from diffusionx.bench import latency_under

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert latency_under(saved, CALIB, get_profile("measured"))[dx.name] == pytest.approx(m["session_latency_mean_s"])
    slower_edge = {**CALIB, "edge": {k: 2 * v for k, v in CALIB["edge"].items()}}
    assert latency_under(saved, slower_edge, get_profile("measured"))[dx.name] > m["session_latency_mean_s"]


@pytest.mark.filterwarnings("ignore:the embedded models know only")  # the out-of-vocabulary prompt
def test_evaluate_on_plain_string_sessions(tmp_path, untrained_pair):
    """`diffusionx evaluate --sessions FILE`: plain-string rounds; an out-of-vocabulary final is
    not scored and leaves FID without references, the rest are scored."""
    from diffusionx.bench.quality import evaluate_pair

    path = tmp_path / "plain.jsonl"
    rows = [*PLAIN_SESSIONS, {"rounds": ["a circle", "a photo of a cat"]}]
    path.write_text("".join(json.dumps(s) + "\n" for s in rows))
    sessions, _ = load_sessions(str(path), 10)
    report = evaluate_pair(untrained_pair, sessions, tmp_path / "eval", steps=2, batch=8)
    for role in ("edge", "cloud"):
        assert report[role]["n_unparseable"] == 1 and report[role]["attribute_accuracy"] is not None
        assert report[role]["fid"] is None
    assert report["settings"]["n_prompts"] == 3


@pytest.mark.filterwarnings("ignore:the embedded models know only")
def test_evaluate_cli_on_out_of_vocabulary_sessions(tmp_path, capsys):
    """`diffusionx evaluate --sessions FILE` whose finals are all out of vocabulary: nothing to
    score, said as n/a rather than a crash."""
    from diffusionx.cli import main

    path = tmp_path / "cats.jsonl"
    path.write_text(json.dumps({"rounds": ["a cat", "a photo of a cat"]}) + "\n")
    args = ["evaluate", "--model", "untrained", "--sessions", str(path), "--steps", "2", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    edge_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("edge"))
    assert edge_line.split()[2:4] == ["n/a", "n/a"]  # FID, attribute accuracy


@pytest.mark.slow
def test_vs_cloud_only_figures_hold_next_to_a_busy_process(tmp_path, untrained_pair):
    """The same command twice, once while another process spins on a core: interleaved timing
    keeps every "vs cloud-only" figure's sign and moves it by less than 5 points."""
    import subprocess
    import sys

    from diffusionx.bench import get_profile, run_bench

    sessions, workload = load_sessions(None, 3)
    methods = default_methods([0.5])

    def figures(out):
        report = run_bench(untrained_pair, sessions, methods, get_profile("laptop-gpu"), out, workload=workload,
                           steps=6, batch=8, score_quality=False)
        cloud = report["methods"]["cloud-only"]["session_latency_mean_s"]
        noise = report["calibration_measured_s"]["noise"]
        assert set(noise) == {"edge", "cloud"} and noise["edge"]["unet_step_s"] >= 0
        return {name: m["session_latency_mean_s"] / cloud - 1 for name, m in report["methods"].items()
                if name != "cloud-only"}

    quiet = figures(tmp_path / "quiet")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = figures(tmp_path / "busy")
    finally:
        busy.kill()
        busy.wait()
    for name, value in quiet.items():
        assert (value > 0) == (loaded[name] > 0), (name, value, loaded[name])
        assert abs(value - loaded[name]) < 0.05, (name, value, loaded[name])


def test_paired_ratio_interval_covers_the_ratio_and_skips_unscored_items():
    from diffusionx.bench.run import paired_ratio_ci95

    rng = np.random.default_rng(1)
    baseline = list(rng.uniform(0.5, 1.0, 200))
    worse = [0.9 * b for b in baseline]
    out = paired_ratio_ci95([*worse, None], [*baseline, 0.7])
    assert out["n"] == 200 and out["ratio"] == pytest.approx(0.9)
    low, high = out["ci95"]
    assert high - low < 1e-9  # every pair in the same proportion: no spread to resample
    noisy = [b + e for b, e in zip(baseline, rng.normal(0, 0.2, 200))]
    out = paired_ratio_ci95(noisy, baseline)
    assert out["ci95"][0] < out["ratio"] < out["ci95"][1] and out["ci95"][1] - out["ci95"][0] > 0.02
    assert paired_ratio_ci95([None, 0.5], [0.5, None]) is None

"""Noise-level predictors: the choice rule, the regressors, the policies, collect -> train -> predict."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

from diffusionx.engine import check_strength
from diffusionx.errors import InvalidInputError
from diffusionx.predictors import (
    GRID,
    LearnedPolicy,
    LoadAwarePolicy,
    MLPRegressor,
    Predictors,
    SimilarityRule,
    TreesRegressor,
    choose_strength,
    gap_curve,
    label,
    load_regressor,
    quality,
)
from diffusionx.predictors.policies import ASSET_DIR, MANIFEST

KNOWN = np.array([-0.40, -0.20, -0.06, -0.03, -0.015, -0.005, 0.01, -0.002, 0.0, 0.0])


# ----- labels and the choice rule --------------------------------------------------------------
def test_label_from_known_curve_depends_on_eps():
    assert label(KNOWN, eps=0.02) == 0.5  # first point within 0.02 of the reference
    assert label(KNOWN, eps=0.05) == 0.4
    assert label(KNOWN, eps=0.25) == 0.2
    assert label(KNOWN, eps=0.0) == 0.7  # only points at least as good as the reference


def test_gap_curve_and_quality():
    q = quality([0.5, 0.8, 1.0], [20.0, 25.0, 30.0])
    np.testing.assert_allclose(q, [0.7, 1.05, 1.3])
    np.testing.assert_allclose(gap_curve(q), [-0.6, -0.25, 0.0])


def test_choice_rule_cost_weight_floor_and_bounds():
    # a cost weight accepts a shortfall for fewer steps; the floor caps how much
    assert choose_strength(KNOWN, eps=0.02, cost_weight=0.0) == 0.5
    assert choose_strength(KNOWN, eps=0.02, cost_weight=0.3) < 0.5
    assert choose_strength(KNOWN, eps=0.02, cost_weight=10.0, max_drop=0.05) == 0.4
    assert choose_strength(KNOWN, eps=0.02, cost_weight=10.0, max_drop=0.05, min_strength=0.6) == 0.6
    # nothing good enough: the reference itself
    assert choose_strength(np.r_[np.full(9, -1.0), 0.0], eps=0.02) == 1.0
    with pytest.raises(ValueError):
        choose_strength(KNOWN[:5])


def test_choice_is_non_increasing_in_cost_weight_and_respects_floor():
    rng = np.random.default_rng(0)
    for _ in range(200):
        gaps = np.r_[rng.normal(-0.05, 0.1, 9), 0.0]
        chosen = [choose_strength(gaps, eps=0.02, cost_weight=w, max_drop=0.05) for w in np.linspace(0, 2, 21)]
        assert all(a >= b for a, b in itertools.pairwise(chosen))
        assert all(gaps[GRID.index(s)] >= -0.05 - 1e-9 for s in chosen)


# ----- regressors ------------------------------------------------------------------------------
def _synthetic(n=120, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.stack([np.tanh(x[:, j]) - 0.1 * j + 0.5 * x[:, (j + 1) % d] for j in range(k)], axis=1)
    return x, y


def test_trees_match_sklearn_and_survive_json(tmp_path):
    from sklearn.ensemble import GradientBoostingRegressor

    x, y = _synthetic()
    trees = TreesRegressor.fit(x, y, n_estimators=30, seed=0)
    ref = GradientBoostingRegressor(
        n_estimators=30,
        max_depth=3,
        learning_rate=0.05,
        subsample=0.8,
        max_features=0.3,
        min_samples_leaf=3,
        random_state=0,
    ).fit(x, y[:, 0])
    np.testing.assert_allclose(trees.predict(x)[:, 0], ref.predict(x), atol=1e-4)
    loaded = load_regressor(trees.save(tmp_path / "t.json"))
    np.testing.assert_allclose(loaded.predict(x), trees.predict(x), atol=1e-6)
    assert loaded.predict(x[0]).shape == (3,) and loaded.n_features == x.shape[1]


def test_mlp_learns_and_survives_safetensors(tmp_path):
    x, y = _synthetic(n=300)
    mlp = MLPRegressor.fit(x, y, hidden=(32,), max_iter=300)
    assert np.mean(np.abs(mlp.predict(x) - y)) < np.mean(np.abs(y - y.mean(0)))  # better than the mean
    path = mlp.save(tmp_path / "m.safetensors")
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    loaded = load_regressor(path)
    np.testing.assert_allclose(loaded.predict(x), mlp.predict(x), atol=1e-6)


# ----- policies --------------------------------------------------------------------------------
class _Const:
    """A regressor stub that predicts a fixed gap curve (all grid points but 1.0)."""

    def __init__(self, gaps):
        self.gaps = np.asarray(gaps[:-1], np.float32)

    def predict(self, x):
        return self.gaps


class _Features:
    def edge(self, previous_prompt, prompt, latents):
        return np.zeros(3, np.float32)

    def cloud(self, prompt, latents):
        return np.zeros(3, np.float32)


def _stub_predictors(edge=KNOWN, cloud=KNOWN):
    return Predictors(_Const(edge), _Const(cloud), _Features())


def test_policies_obey_the_protocol_and_bounds():
    latents = torch.zeros(1, 4, 16, 16)
    predictors = _stub_predictors()

    class _Sentence:
        def similarity(self, a, b):
            return 0.9

    policies = [
        LearnedPolicy(predictors),
        LearnedPolicy(predictors, edge_eps=0.25, cloud_cost=0.5, min_cloud=0.3),
        LoadAwarePolicy(predictors, load_source=lambda: {"estimated_wait_s": 30.0}),
        SimilarityRule(sentence=_Sentence()),
    ]
    for policy in policies:
        edge = policy.edge_strength("a red circle", "a blue circle", latents)
        cloud = policy.cloud_strength("a blue circle", latents, None)
        for s in (edge, cloud):
            assert isinstance(s, float) and check_strength(s) == s
    assert policies[0].edge_strength("a", "b", latents) == 0.5
    assert policies[1].edge_strength("a", "b", latents) == 0.2  # eps is a runtime parameter
    assert policies[1].cloud_strength("a", latents, None) >= 0.3
    assert policies[3].edge_strength("a", "b", latents) == pytest.approx(0.5)


def test_load_aware_is_non_increasing_in_load_and_never_below_the_floor():
    rng = np.random.default_rng(1)
    latents = torch.zeros(1, 4, 16, 16)
    for _ in range(30):
        gaps = np.r_[np.sort(rng.normal(-0.1, 0.1, 9)), 0.0]
        policy = LoadAwarePolicy(_stub_predictors(cloud=gaps), wait_weight=0.02, max_drop=0.08)
        waits = [0, 1, 2, 5, 10, 20, 40, 80, 1000]
        chosen = [policy.cloud_strength("p", latents, {"estimated_wait_s": w}) for w in waits]
        assert all(a >= b for a, b in itertools.pairwise(chosen))
        assert all(gaps[GRID.index(s)] >= -0.08 - 1e-9 for s in chosen)
    # the load comes from the argument, the load source, or the queue when the estimate is missing
    policy = LoadAwarePolicy(_stub_predictors(), wait_weight=0.05, max_drop=0.05)
    assert policy.cloud_strength("p", latents, None) == 0.5
    assert policy.cloud_strength("p", latents, {"queue_depth": 100, "step_time_s": 1.0}) == 0.4
    policy.load_source = lambda: {"estimated_wait_s": 100.0}
    assert policy.cloud_strength("p", latents, None) == 0.4

    def broken():
        raise ConnectionError("cloud down")

    policy.load_source = broken
    assert policy.cloud_strength("p", latents, None) == 0.5


def test_floors_come_from_the_manifest_unless_given():
    latents = torch.zeros(1, 4, 16, 16)
    predictors = _stub_predictors()
    predictors.manifest = {"policy_defaults": {"min_edge": 0.7, "min_cloud": 0.9}}
    tuned = LearnedPolicy(predictors)
    assert (tuned.min_edge, tuned.min_cloud) == (0.7, 0.9)
    assert tuned.edge_eps == 0.02  # no tuned eps: the default
    assert tuned.edge_strength("a", "b", latents) == 0.7  # the predicted 0.5 is under the floor
    assert tuned.cloud_strength("a", latents, None) == 0.9
    explicit = LearnedPolicy(predictors, min_edge=0.0, min_cloud=0.0)
    assert explicit.edge_strength("a", "b", latents) == 0.5
    assert LearnedPolicy(_stub_predictors()).min_edge == 0.0  # no tuned floors: none
    load_aware = LoadAwarePolicy(predictors)  # trades cloud steps under load: only max_drop bounds it
    assert (load_aware.min_edge, load_aware.min_cloud) == (0.7, 0.0)
    predictors.manifest["policy_defaults"]["edge_eps"] = 0.05
    assert tuned.edge_eps == 0.05 and LearnedPolicy(predictors, edge_eps=0.0).edge_eps == 0.0


def test_tune_picks_the_fastest_floor_that_meets_the_target():
    from diffusionx.predictors.tune import finals_ok, pick, previews_ok

    scratch = {"edited_preview_attribute_accuracy": 0.50, "edited_preview_clip_score": 60.0}
    def run(latency, attr, score):
        return {"session_latency_mean_s": latency, "edited_preview_attribute_accuracy": attr,
                "edited_preview_clip_score": score}

    floors = {0.0: run(1.0, 0.45, 61), 0.4: run(2.0, 0.495, 59), 0.6: run(3.0, 0.52, 62)}
    assert pick(floors, lambda m: previews_ok(m, scratch, 0.02)) == (0.4, True)
    assert pick(floors, lambda m: previews_ok(m, scratch, 0.0)) == (0.6, True)
    assert pick(floors, lambda m: m["session_latency_mean_s"] > 5) == (0.6, False)  # none: the highest floor
    cloud_only = {"attribute_accuracy": 0.66, "clip_score": 82.0}
    assert finals_ok({"attribute_accuracy": 0.655, "clip_score": 81.5}, cloud_only, 0.01)
    assert not finals_ok({"attribute_accuracy": 0.64, "clip_score": 82.0}, cloud_only, 0.01)
    close = {"attribute_accuracy": 0.655, "clip_score": 81.5, "preview_fidelity": {"psnr_db": 18.0}}
    assert finals_ok(close, cloud_only, 0.01) and not finals_ok(close, cloud_only, 0.01, fidelity_floor=20.0)
    assert finals_ok({**close, "preview_fidelity": {"psnr_db": 21.0}}, cloud_only, 0.01, fidelity_floor=20.0)
    # no floor reaches the quality target: refine mode keeps the highest floor that still keeps the preview
    from diffusionx.predictors.tune import safest_cloud

    by_cloud = {0.3: {"preview_fidelity": {"psnr_db": 24.0}}, 0.5: {"preview_fidelity": {"psnr_db": 21.0}},
                1.0: {"preview_fidelity": {"psnr_db": 15.0}}}
    assert safest_cloud(by_cloud, 20.0) == 0.5
    assert safest_cloud(by_cloud, 0.0) == 1.0  # no fidelity floor: the highest
    assert safest_cloud(by_cloud, 30.0) == 1.0  # none keeps it: the highest


def test_bench_policy_specs():
    from diffusionx.bench.run import parse_policy

    method = parse_policy("learned-eps0.05-cw0.1", 0.6)
    assert method.name == "diffusionx-learned-eps0.05-cw0.1" and method.kind == "diffusionx"
    assert method.policy.edge_eps == 0.05 and method.policy.cloud_cost == 0.1
    method = parse_policy("load-aware-wait10-floor0.1", 0.6)
    assert isinstance(method.policy, LoadAwarePolicy) and method.policy.max_drop == 0.1
    assert method.policy.load_source() == {"estimated_wait_s": 10.0}
    assert isinstance(parse_policy("similarity-rule", 0.6).policy, SimilarityRule)
    assert parse_policy("fixed-0.5", 0.6).policy.cloud == 0.5
    assert parse_policy("learned", 0.6).policy._min_edge is None  # the tuned floors, when it loads
    assert parse_policy("learned-emin0-cmin1", 0.6).policy._min_cloud == 1.0
    for bad in ("learned-zz3", "load-aware-wait", "oracle"):
        with pytest.raises(InvalidInputError):
            parse_policy(bad, 0.6)


# ----- shipped weights -------------------------------------------------------------------------
def test_shipped_predictors_load_and_predict():
    import json

    manifest_path = ASSET_DIR / MANIFEST
    if not manifest_path.exists():
        pytest.skip("no predictors shipped in this checkout")
    manifest = json.loads(manifest_path.read_text())
    for kind in ("edge", "cloud"):
        model = load_regressor(ASSET_DIR / manifest[kind]["file"])
        x = np.zeros(model.n_features, np.float32)
        gaps = model.predict(x)
        assert gaps.shape == (len(manifest["grid"]) - 1,) and np.all(np.isfinite(gaps))
        start = time.perf_counter()
        for _ in range(100):
            model.predict(x)
        per_call = (time.perf_counter() - start) / 100
        print(f"{kind} predictor ({manifest[kind]['kind']}): {per_call * 1e3:.3f} ms per prediction")


# ----- collect -> train -> predict on the untrained pair -----------------------------------------
def _cheap_scorer(images, prompts):
    """Stand-in for the evaluator: deterministic, image-dependent numbers in [0, 1] and [0, 100]."""
    arrays = [np.asarray(image, np.float32) / 255.0 for image in images]
    attr = [float(a[..., 0].mean()) for a in arrays]
    clip = [float(100 * a[..., 2].std()) for a in arrays]
    return attr, clip


@pytest.mark.slow
def test_collect_train_predict_round_trip(untrained_pair, tmp_path):
    from diffusionx.predictors import FeatureExtractor
    from diffusionx.predictors.collect import collect, interleave, read_rows
    from diffusionx.predictors.train import train_predictors
    from diffusionx.world import generate_sessions

    features = FeatureExtractor.from_engine(untrained_pair.edge)
    train = [dict(s, rounds=s["rounds"][:3]) for s in generate_sessions(2, "train")]
    val = [dict(s, rounds=s["rounds"][:2]) for s in generate_sessions(1, "validation")]
    work = interleave([("train", train), ("validation", val)])
    out = tmp_path / "sweep.jsonl"
    grid = (0.5, 1.0)
    kwargs = dict(steps=2, grid=grid, batch=32, chunk=2, scorer=_cheap_scorer, features=features, progress=False)
    first = collect(untrained_pair, work[:2], out, **kwargs)
    assert first["sessions_total"] == 2
    again = collect(untrained_pair, work, out, **kwargs)  # resumes: only the missing session runs
    assert again["sessions_this_run"] == 1 and again["sessions_total"] == 3
    rows = read_rows(out)
    assert rows[0]["kind"] == "header" and rows[0]["grid"] == list(grid)
    edge_rows = [r for r in rows if r["kind"] == "edge"]
    assert len(edge_rows) == 2 + 2 + 1 and all(len(r["attribute_accuracy"]) == 2 for r in edge_rows)
    assert all(r["unet_steps"] == [1, 2] for r in rows if r["kind"] in ("edge", "cloud"))
    with pytest.raises(ValueError, match="steps"):
        collect(untrained_pair, work, out, **{**kwargs, "steps": 3})

    # edge now, cloud later (from the edge run's final previews) gives the same rows as both at once
    from diffusionx.predictors.collect import previews_from

    split_out = tmp_path / "edge.jsonl"
    collect(untrained_pair, work[:1], split_out, directions="edge", **kwargs)
    previews = previews_from([split_out])
    assert len(previews) == 1 and not any(r["kind"] == "cloud" for r in read_rows(split_out))
    collect(untrained_pair, [], tmp_path / "cloud.jsonl", directions="cloud", previews=previews, **kwargs)
    late = [r for r in read_rows(tmp_path / "cloud.jsonl") if r["kind"] == "cloud"]
    both = [r for r in rows if r["kind"] == "cloud" and (r["split"], r["session"]) == (work[0][0], work[0][1])]
    # the two runs batch the cloud pass differently, which moves float32 U-Net outputs (and so a
    # pixel here and there by one level): equal up to that, not to the last digit
    assert len(late) == 1 and late[0]["clip_score"] == pytest.approx(both[0]["clip_score"], abs=0.02)

    # DAgger rollout: sessions continue from the policy's choice, and the rows say so
    from diffusionx.policies import FixedStrength
    from diffusionx.predictors.collect import decode_latents

    dagger = tmp_path / "dagger.jsonl"
    kept = dict(kwargs, grid=(0.2, 0.5, 1.0))
    collect(untrained_pair, work[:1], dagger, directions="edge", rollout=FixedStrength(edge=0.5, cloud=1.0),
            rollout_name="fixed-0.5", **kept)
    rolled = read_rows(dagger)
    assert rolled[0]["rollout"] == "fixed-0.5"
    assert [r["rollout_strength"] for r in rolled if r["kind"] == "edge"] == [0.5, 0.5]
    # round 3 starts from round 2's strength-0.5 result: its previous latent is that one's
    z2 = untrained_pair.edge.generate(
        train[0]["rounds"][1]["prompt"], steps=2, strength=0.5, seed=rolled[1]["seed"],
        init_latents=decode_latents(rolled[1]["previous_latents"]),
    ).latents
    assert torch.allclose(decode_latents(rolled[2]["previous_latents"]), z2.half().float(), atol=1e-2)
    with pytest.raises(ValueError, match="rollout"):
        collect(untrained_pair, work, dagger, directions="edge", **kept)  # another rollout: not a resume

    report = train_predictors(out, tmp_path / "model", text_encoder="untrained", progress=False)
    for kind in ("edge", "cloud"):
        d = report["directions"][kind]
        assert d["selected"] in ("mlp", "trees")
        assert set(d["models"]["mlp"]["validation"]) >= {"curve_mae", "label_mae", "gap"}
        assert "oracle" in d["baselines"]["validation"]
    # retrain the edge alone (train rows only): the cloud predictor and its report stay
    cloud_file = (tmp_path / "model" / "cloud.json").read_text() if report["directions"]["cloud"][
        "selected"] == "trees" else (tmp_path / "model" / "cloud.safetensors").read_bytes()
    edge_only = train_predictors(out, tmp_path / "model", text_encoder="untrained", progress=False,
                                 refit_all=False, directions=("edge",))
    assert edge_only["directions"]["cloud"] == json.loads(json.dumps(report["directions"]["cloud"]))
    assert edge_only["directions"]["edge"]["shipped_n_train"] == 2 + 2  # the validation row is not in it
    manifest = json.loads((tmp_path / "model" / MANIFEST).read_text())
    assert manifest["cloud"]["n_train"] == report["directions"]["cloud"]["shipped_n_train"]
    assert cloud_file in ((tmp_path / "model" / "cloud.json").read_text() if manifest["cloud"]["kind"] == "trees"
                          else (tmp_path / "model" / "cloud.safetensors").read_bytes(),)
    with pytest.raises(ValueError, match="grid"):
        train_predictors(dagger, tmp_path / "model", text_encoder="untrained", progress=False, directions=("edge",))
    with pytest.raises(ValueError, match="none to keep"):
        train_predictors(out, tmp_path / "fresh", text_encoder="untrained", progress=False, directions=("edge",))
    predictors = Predictors.load(tmp_path / "model", features=features)
    assert predictors.grid == grid
    policy = LoadAwarePolicy(predictors)
    latents = edge_rows[0]["previous_latents"]
    from diffusionx.predictors.collect import decode_latents

    z = decode_latents(latents)
    assert policy.edge_strength("a red circle", "a blue circle", z) in grid
    assert policy.cloud_strength("a blue circle", z, {"estimated_wait_s": 5.0}) in grid

    # tune: whole sessions through the benchmark, floors into the manifest
    from diffusionx.predictors.tune import tune_policy

    sessions = [dict(s, rounds=s["rounds"][:3]) for s in generate_sessions(2, "validation")]
    summary = tune_policy(untrained_pair, sessions, tmp_path / "model", tmp_path / "tune", edge_floors=[0.0, 0.5],
                          cloud_floors=[0.5, 1.0], edge_eps=[0.02, 0.05], steps=2, batch=8, write=True)
    chosen = summary["policy_defaults"]
    assert chosen["min_edge"] in (0.0, 0.5) and chosen["min_cloud"] in (0.5, 1.0) and chosen["edge_eps"] in (0.02, 0.05)
    settings = {(s["edge_eps"], s["min_edge"]): s for s in summary["edge_settings"]}
    assert set(settings) == {(0.02, 0.0), (0.02, 0.5), (0.05, 0.0), (0.05, 0.5)}
    assert set(summary["cloud_floors"]) == {"0.5", "1.0"}
    scratch = summary["references"]["scratch"]
    assert scratch["edge_unet_steps_per_session"] == 2 * 3  # every round from noise, 2 steps each
    assert settings[0.02, 0.5]["edge_unet_steps_per_session"] < scratch["edge_unet_steps_per_session"]
    assert (tmp_path / "tune" / "tune.json").is_file()
    assert (tmp_path / "tune" / "edge_settings" / "results.md").is_file()
    tuned = LearnedPolicy(Predictors.load(tmp_path / "model", features=features))
    assert (tuned.edge_eps, tuned.min_edge, tuned.min_cloud) == (
        chosen["edge_eps"], chosen["min_edge"], chosen["min_cloud"])


def test_cli_predictors_errors(tmp_path, capsys):
    from diffusionx.cli import main

    assert main(["predictors", "train", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "collect" in capsys.readouterr().err
    assert main(["predictors", "collect", "--train", "0", "--validation", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["predictors", "collect", "--strengths", "0.5,0.2"])
    capsys.readouterr()
    assert main(["predictors", "collect", "--train", "1", "--rollout-policy", "oracle"]) == 2
    assert "--rollout-policy takes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a malformed spec is refused while parsing, by the registry
        main(["predictors", "collect", "--train", "1", "--rollout-policy", "learned-zz3"])
    assert exc.value.code == 2 and "bad parameter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predictors", "tune", "--edge-eps", "-0.1"])
    assert "tolerances must be" in capsys.readouterr().err


def test_oracle_policy_reads_labels_from_a_sweep(tmp_path):
    import json

    from diffusionx.bench.run import parse_policy
    from diffusionx.predictors import OraclePolicy

    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    ramp = [0.1 * i for i in range(1, 11)]  # quality rises with strength: label = smallest within eps of 1.0
    flat = [1.0] * 10
    rows = [
        {"kind": "header", "grid": grid},
        {"kind": "edge", "previous_prompt": "a red circle", "prompt": "a red square", "strengths": grid,
         "attribute_accuracy": ramp, "clip_score": [0.0] * 10},
        {"kind": "cloud", "prompt": "a red square", "strengths": grid, "attribute_accuracy": flat,
         "clip_score": [0.0] * 10},
    ]
    path = tmp_path / "sweep.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    oracle = OraclePolicy(path, edge_eps=0.15)
    assert oracle.edge_strength("a red circle", "a red square", None) == 0.9  # 0.9 is 0.1 short, within 0.15
    assert OraclePolicy(path, edge_eps=0.0).edge_strength("a red circle", "a red square", None) == 1.0
    assert oracle.cloud_strength("a red square", None, None) == 0.1  # every strength is as good as cloud-only
    assert oracle.edge_strength("a blue circle", "a blue star", None) == 1.0 and oracle.misses == 1
    method = parse_policy("oracle-eps0.15", 0.6, [str(path)])
    assert method.name == "diffusionx-oracle-eps0.15" and method.policy.edge[("a red circle", "a red square")] == 0.9
    with pytest.raises(InvalidInputError, match="predictors collect"):
        parse_policy("oracle", 0.6, [str(tmp_path / "missing.jsonl")])


def test_collect_reads_plain_string_sessions(tmp_path, capsys, monkeypatch, untrained_pair):
    """`predictors collect --sessions FILE` takes rounds that are plain strings (as objects, a
    missing scene read from the prompt) and refuses a file with an empty round, naming it."""
    import json

    import diffusionx.models
    import diffusionx.predictors.collect
    from diffusionx.cli import main

    seen = {}

    def fake_collect(pair, work, out, **kwargs):
        seen["work"] = work
        return {"sessions_this_run": len(work), "remaining": 0}

    monkeypatch.setattr(diffusionx.models, "load_pair", lambda *a, **k: untrained_pair)
    monkeypatch.setattr(diffusionx.predictors.collect, "collect", fake_collect)
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"rounds": ["a circle", "a red circle on the left"]}) + "\n")
    args = ["predictors", "collect", "--train", "0", "--validation", "0", "--sessions", str(path),
            "--out", str(tmp_path / "sweep.jsonl")]
    assert main(args) == 0
    [(split, _, session)] = seen["work"]
    assert split == "train"  # --sessions-split's default
    assert [r["prompt"] for r in session["rounds"]] == ["a circle", "a red circle on the left"]
    assert session["rounds"][1]["scene"]["objects"][0]["position"] == "left"
    assert session["rounds"][0]["edit"] == "start"
    path.write_text(json.dumps({"rounds": ["a circle", " "]}) + "\n")
    capsys.readouterr()
    assert main(args) == 2
    assert "round 2 needs a non-empty prompt" in capsys.readouterr().err

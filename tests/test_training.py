import json

import numpy as np
import pytest
import torch

from diffusionx.training.common import EMA, Checkpoint, StepBudget, cosine_lr
from diffusionx.training.embedded import SMOKE_CONFIG as TINY
from diffusionx.training.embedded import train_embedded


def test_cosine_lr_and_budget():
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup=10) == pytest.approx(0.1)
    b = StepBudget(1000, deadline=None)
    b.observe(5)
    assert b.total == 1000 and b.locked


def test_budget_projects_a_run_whose_steps_cost_differently(monkeypatch):
    import diffusionx.training.common as common

    clock = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: clock[0])
    seen = []

    def project(step, seconds_left, seconds_per_step):
        seen.append((step, seconds_left, seconds_per_step))
        return step + seconds_left / (0.5 * seconds_per_step)  # the remaining steps are twice as cheap

    b = StepBudget(10_000, deadline=1000.0 + 100.0, measure_after=4, project=project)
    for step in range(1, 6):  # one second per measured step
        b.observe(step)
        clock[0] += 1.0
    assert b.locked and seen[-1][2] == pytest.approx(1.0)
    assert b.total == int(seen[-1][0] + seen[-1][1] / 0.5)  # the projection, not step + left / per_step


def test_budget_gives_steps_back_after_a_busy_stretch(monkeypatch):
    import diffusionx.training.common as common

    clock = [0.0]
    monkeypatch.setattr(common.time, "time", lambda: clock[0])
    b = StepBudget(100, deadline=1000.0, measure_after=4, recheck=10, cap=5000)
    for step, seconds_per_step in enumerate([1.0] * 20 + [10.0] * 20 + [1.0] * 30):  # fast, busy, fast again
        b.observe(step)
        clock[0] += seconds_per_step
        if step == 39:
            busy_total = b.total
    assert b.total > busy_total  # the count rose again once steps were fast
    assert b.total <= 5000
    b2 = StepBudget(100, deadline=10_000.0, measure_after=4)
    for step in range(10):
        b2.observe(step)
        clock[0] += 0.01
    assert b2.total == 100  # never past the cap, which defaults to the given total


def test_ema_update_is_the_moving_average():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # float params + an int buffer
    ema = EMA(m, 0.9)
    expected = {k: v.clone().float() for k, v in m.state_dict().items()}
    for step in range(5):
        m.train()(torch.randn(8, 3)).pow(2).mean().backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
        ema.update(m, step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in m.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v.float() if v.dtype.is_floating_point else v.clone()
    for k in expected:
        torch.testing.assert_close(ema.shadow[k].to(expected[k].dtype), expected[k])
    assert ema.shadow["1.num_batches_tracked"].item() == 5


def test_checkpoint_round_trip_resumes_optimizer(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ema = EMA(m, 0.9)
    for step in range(3):
        m(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        ema.update(m, step)
    ck = Checkpoint(tmp_path / "ck")
    ck.save({"step": 3}, {"m": m}, opt, ema)
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    ema2 = EMA(m2, 0.9)
    assert ck.load({"m": m2}, opt2, ema2)["step"] == 3
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)


@pytest.mark.slow
def test_train_embedded_smoke(tmp_path):
    from diffusers import StableDiffusionPipeline

    out, export = tmp_path / "run", tmp_path / "export"
    summary = train_embedded(out, config=TINY, export_to=export, progress=False, parallel=False)
    assert summary["stages"]["unet_cloud"]["done"] and summary["stages"]["vae"]["step"] == 3
    for stage in ("text_encoder", "vae", "vae_decoder", "unet_edge", "unet_cloud"):
        lines = (out / "logs" / f"{stage}.jsonl").read_text().splitlines()
        assert len(lines) == 3 and np.isfinite(json.loads(lines[-1])["loss"])
    pair = json.loads((export / "pair.json").read_text())
    assert pair["trained"] and pair["shared_latent_space"] and pair["height"] == 64
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pt"))
    # Resuming a finished run trains nothing more.
    again = train_embedded(out, config=TINY, export_to=export, progress=False, parallel=False)
    assert again["stages"]["unet_edge"]["step"] == 3
    for role in ("edge", "cloud"):
        pipe = StableDiffusionPipeline.from_pretrained(export / role, local_files_only=True, torch_dtype=torch.float32)
        assert pipe.unet.dtype == torch.float32
        assert pipe.vae.config.scaling_factor != 1.0
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a large red circle on the left on a blue background", num_inference_steps=2, height=64,
                   width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_parallel_rendering_is_deterministic(monkeypatch):
    from diffusionx.training import data

    monkeypatch.setattr(data, "_CHUNK", 8)
    scenes = data.split_scenes(np.random.default_rng(0), 40)
    a = data.render_all(scenes, np.random.default_rng(1), workers=2)
    b = data.render_all(scenes, np.random.default_rng(1), workers=2)
    assert a.shape == (40, 64, 64, 3) and np.array_equal(a, b)
    # Without jitter the pool renders exactly what one process does.
    assert np.array_equal(data.render_all(scenes, None, workers=2), data.render_all(scenes, None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_training_without_a_gpu_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        train_embedded(tmp_path / "run", config=TINY, export_to=tmp_path / "x", device="cuda", progress=False)


def test_smoke_run_refuses_to_replace_the_shipped_pair(tmp_path):
    from diffusionx.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="--export-to"):
        train_embedded(tmp_path / "run", config=TINY, progress=False)
    assert not (tmp_path / "run").exists()


def test_distillation_taps_and_projects_the_teachers_features(untrained_pair):
    """The edge's mid/up block features map onto the cloud's through 1x1 projections, and the
    feature loss is 0 exactly when they match (and the gradient reaches the projections)."""
    import copy

    import torch

    from diffusionx.training.distill import FeatureTap, feature_loss, feature_projections

    edge, cloud = copy.deepcopy(untrained_pair.edge.unet).float(), copy.deepcopy(untrained_pair.cloud.unet).float()
    x = torch.randn(2, *untrained_pair.edge.latent_shape()[1:])
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 77, edge.config.cross_attention_dim)
    projections = feature_projections(edge, cloud, x, t, cond)
    taps = FeatureTap(edge), FeatureTap(cloud)
    edge(x, t, encoder_hidden_states=cond)
    with torch.no_grad():
        cloud(x, t, encoder_hidden_states=cond)
    student, teacher = (tap.take() for tap in taps)
    assert len(student) == len(teacher) == len(projections) == 1 + len(edge.up_blocks)
    loss = feature_loss(student, teacher, projections)
    loss.backward()
    assert loss.item() > 0 and projections[0].weight.grad is not None
    matched = [proj(s).detach() for s, proj in zip(student, projections)]
    assert feature_loss(student, matched, projections).item() < 1e-10
    for tap in taps:
        tap.close()
    edge(x, t, encoder_hidden_states=cond)
    assert taps[0].features == []  # closed taps keep nothing


def test_checkpoint_keeps_several_optimizers_and_averages(tmp_path):
    import torch

    from diffusionx.training.common import EMA, Checkpoint

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt_a, opt_b = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    b(a(torch.ones(4, 3))).sum().backward()
    opt_a.step()
    opt_b.step()
    ema_a, ema_b = EMA(a, 0.9), EMA(b, 0.9)
    ck = Checkpoint(tmp_path / "ck")
    ck.save({"step": 1}, {"a": a, "b": b}, opt_a, optimizers={"opt_b": opt_b}, emas={"ema_a": ema_a, "ema_b": ema_b})
    a2, b2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt_a2, opt_b2 = torch.optim.AdamW(a2.parameters()), torch.optim.AdamW(b2.parameters())
    ema_a2, ema_b2 = EMA(a2, 0.9), EMA(b2, 0.9)
    state = ck.load({"a": a2, "b": b2}, opt_a2, optimizers={"opt_b": opt_b2}, emas={"ema_a": ema_a2, "ema_b": ema_b2})
    assert state["step"] == 1 and {"optimizer", "opt_b"} <= set(state)
    torch.testing.assert_close(b2.weight, b.weight)
    torch.testing.assert_close(opt_b2.state_dict()["state"][0]["exp_avg"], opt_b.state_dict()["state"][0]["exp_avg"])
    torch.testing.assert_close(ema_b2.shadow["weight"], ema_b.shadow["weight"])


@pytest.mark.slow
def test_distill_with_no_cloud_share_trains_the_edge_alone(tmp_path):
    """`train pair --cloud-share 0`: the cloud and the shared text encoder stay the teacher they
    were (so cloud-only results do not move); only the edge's weights change."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from diffusionx.training.distill import SMOKE_DISTILL_CONFIG, distill_pair, resolve_source

    source, export = resolve_source("shipped"), tmp_path / "export"
    config = replace(SMOKE_DISTILL_CONFIG, cloud_share=0.0)
    summary = distill_pair(tmp_path / "run", export_to=export, config=config, keep="always", progress=False)
    assert summary["kept"] and summary["steps"] == config.steps and summary["cloud_steps"] == 0

    def weights(folder, part):
        return load_file(str(next((folder / part).glob("*.safetensors"))))

    for part in ("cloud/unet", "cloud/text_encoder", "edge/text_encoder"):
        before, after = weights(source, part), weights(export, part)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k].float(), after[k].float()) for k in before), part
    before, after = weights(source, "edge/unet"), weights(export, "edge/unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)

"""Continue training a model pair: the cloud U-Net (and the shared text encoder) on the world's
partial-prompt captions, and the edge U-Net *distilled* from the cloud, as BK-SDM / Tiny-SD were
from SD v1.5.

One process holds both U-Nets. Every step draws one batch (scenes rendered with jitter, a caption
that may leave attributes unsaid, a noise level), and:

- phase 1 (``cloud_share`` of the steps): the cloud U-Net and the text encoder learn the
  epsilon-prediction loss (min-SNR weights); the edge learns from the same batch;
- phase 2 (the rest): the cloud and the text encoder are frozen teachers; the edge alone trains,
  so its steps are several times cheaper.

The edge's loss is the data loss plus *output-level* distillation (match the cloud's noise
prediction on the same noisy latent, prompt and timestep) plus *feature-level* distillation
(match the cloud's mid-block and up-block activations through learned 1x1 projections, each
normalised by the teacher feature's variance), the recipe of BK-SDM (Kim et al., 2023). The VAE
is shared and frozen: latents keep their meaning, so edge previews still hand off to the cloud.

Each run starts from a pair folder (``shipped`` = the package's assets) and ends with a check on
validation prompts: the new pair is exported only when the evaluator's attribute accuracy of
cloud and edge together improves on the pair it started from (``--keep always`` exports anyway).
Run after run, `diffusionx train pair --resume-from shipped` climbs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ..world.captions import caption_with_style, named_part, sample_style
from ..world.scene import Scene, random_scene, scene_key, scene_split
from ..world.vocab import COLORS
from .common import EMA, Checkpoint, LossLog, StageLoop, StepBudget, adamw, cosine_lr
from .data import render_all, to_tensor_images
from .embedded import SEED, default_assets_dir

KEEP_POLICIES = ("improved", "always")
PHASE2_COST = 0.35  # a phase-2 step (edge only, teacher forward) / a phase-1 step, measured on CPU


@dataclass(frozen=True)
class DistillConfig:
    seed: int = SEED + 100
    images: int = 12000  # rendered training scenes (train split), encoded once by the frozen VAE
    backdrop_share: float = 0.03  # scenes with no object: "a blue background" is a prompt too
    one_object_share: float = 0.45  # of the scenes with objects (uniform 1-3 objects would be 1/3)
    # Share of scenes followed by their color-swapped twin (the object's color and the background's
    # exchanged): the pair the cloud confuses most, side by side in the data.
    swap_twin_share: float = 0.2
    # Share of noise levels drawn from the upper half of the schedule, where color, shape and layout
    # are decided (the rest uniform); the low-noise half only sharpens edges.
    high_noise_share: float = 0.4
    batch: int = 32
    steps: int = 200000  # upper bound; a time budget cuts it
    cloud_share: float = 0.7  # share of the steps in which the cloud and text encoder train
    lr_cloud: float = 2e-4
    lr_text: float = 1e-4  # 0 keeps the text encoder frozen
    lr_edge: float = 6e-4
    warmup: int = 50
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    kd_output: float = 1.0  # weights of the edge's loss terms
    kd_feature: float = 0.5
    data_weight: float = 1.0
    # Validation finals of the keep-or-discard check, at the embedded pair's default steps: 64 finals
    # called pair7's edge unchanged (0.852 -> 0.851) where 384 measured +1.3 points (docs/training.md).
    eval_prompts: int = 384
    eval_steps: int = 10
    curve_every: int = 300  # steps between learning-curve points (0: none)
    curve_prompts: int = 32  # validation finals per point, at curve_steps sampler steps
    curve_steps: int = 10
    ckpt_every: int = 100
    log_every: int = 10
    budget_measure_steps: int = 8
    render_workers: int = 1
    autocast_bf16: bool = False  # CUDA: bf16 autocast for the U-Net passes


GPU_DISTILL_CONFIG = replace(DistillConfig(), images=60000, batch=256, lr_cloud=3e-4, lr_edge=1e-3, warmup=200,
                             ckpt_every=1000, log_every=25, budget_measure_steps=60, autocast_bf16=True,
                             curve_every=400, curve_prompts=64)
SMOKE_DISTILL_CONFIG = replace(DistillConfig(), images=24, batch=4, steps=4, ckpt_every=2, log_every=1,
                               eval_prompts=4, eval_steps=2, warmup=1, curve_every=2, curve_prompts=2, curve_steps=2)


def default_config(device: str) -> DistillConfig:
    return GPU_DISTILL_CONFIG if device.startswith("cuda") else DistillConfig()


# ---------------------------------------------------------------- the pair being trained


def resolve_source(source: str | Path) -> Path:
    """``shipped`` -> the package's embedded pair; otherwise a folder with edge/, cloud/, pair.json."""
    folder = default_assets_dir() if str(source) == "shipped" else Path(source)
    if not (folder / "edge" / "unet").is_dir() or not (folder / "cloud" / "unet").is_dir():
        raise InvalidInputError(
            f"--resume-from {source}: {folder} is not a pair folder (it needs edge/ and cloud/ "
            "StableDiffusionPipeline folders); use `shipped` or a folder `train pair` exported"
        )
    return folder


def _load_components(folder: Path, device: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    cloud = folder / "cloud"
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(str(cloud / "tokenizer")),
        "text_encoder": CLIPTextModel.from_pretrained(str(cloud / "text_encoder")).float().to(device),
        "vae": AutoencoderKL.from_pretrained(str(cloud / "vae")).float().to(device).eval(),
        "scheduler": DDIMScheduler.from_pretrained(str(cloud / "scheduler")),
        "cloud": UNet2DConditionModel.from_pretrained(str(cloud / "unet")).float().to(device),
        "edge": UNet2DConditionModel.from_pretrained(str(folder / "edge" / "unet")).float().to(device),
    }


class FeatureTap:
    """Keeps the outputs of a U-Net's mid block and up blocks from its last forward pass."""

    def __init__(self, unet: torch.nn.Module):
        self.features: list[torch.Tensor] = []
        blocks = [unet.mid_block, *unet.up_blocks]
        self.handles = [b.register_forward_hook(self._keep) for b in blocks]

    def _keep(self, module, args, output) -> None:
        self.features.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.features = self.features, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def feature_projections(edge, cloud, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.nn.ModuleList:
    """1x1 convolutions from each tapped edge feature to the cloud's (channel counts differ)."""
    taps = FeatureTap(edge), FeatureTap(cloud)
    with torch.no_grad():
        edge(sample, t, encoder_hidden_states=cond)
        cloud(sample, t, encoder_hidden_states=cond)
    student, teacher = (tap.take() for tap in taps)
    for tap in taps:
        tap.close()
    if [s.shape[-2:] for s in student] != [s.shape[-2:] for s in teacher]:
        raise ValueError("edge and cloud U-Nets must have the same resolutions per block to distill features")
    return torch.nn.ModuleList(torch.nn.Conv2d(s.shape[1], c.shape[1], 1) for s, c in zip(student, teacher))


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], projections) -> torch.Tensor:
    """Mean over blocks of MSE(projected edge feature, cloud feature) / variance of the cloud feature."""
    losses = []
    for s, c, proj in zip(student, teacher, projections):
        c = c.detach().float()
        losses.append(F.mse_loss(proj(s.float()), c) / (c.var() + 1e-6))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- data


def color_swapped(scene: Scene) -> Scene | None:
    """`scene` with its first object's color and the background's exchanged; None when another
    object already has the background's color (the twin would break the world's rule)."""
    first, rest = scene.objects[0], scene.objects[1:]
    if any(obj.color == scene.background for obj in rest):
        return None
    return replace(scene, objects=(replace(first, color=scene.background), *rest), background=first.color)


def training_scenes(rng: np.random.Generator, n: int, cfg: DistillConfig) -> list[Scene]:
    """`n` training scenes: backdrops, then train-split scenes with `one_object_share` of them
    single-object, some followed by their color-swapped twin."""
    n_backdrop = round(n * cfg.backdrop_share)
    scenes = [Scene((), COLORS[i % len(COLORS)]) for i in range(n_backdrop)]
    rest = (1 - cfg.one_object_share) / 2
    while len(scenes) < n:
        count = int(rng.choice(3, p=[cfg.one_object_share, rest, rest])) + 1
        scene = random_scene(rng, count)
        if scene_split(scene) != "train":
            continue
        scenes.append(scene)
        twin = color_swapped(scene) if rng.random() < cfg.swap_twin_share else None
        if twin is not None and scene_split(twin) == "train" and len(scenes) < n:
            scenes.append(twin)
    return scenes


def scenes_digest(scenes: list[Scene]) -> str:
    return hashlib.sha256("\n".join(scene_key(s) for s in scenes).encode()).hexdigest()[:16]


def sample_timesteps(n: int, num_train_timesteps: int, high_noise_share: float, g: torch.Generator) -> torch.Tensor:
    """Uniform noise levels, except that a `high_noise_share` of them come from the upper half."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=g)
    high = torch.randint(num_train_timesteps // 2, num_train_timesteps, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < high_noise_share, high, t)


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption as people write them: about half name everything, the rest leave things out."""
    if not scene.objects:
        return caption_with_style(scene, sample_style(rng))
    return caption_with_style(named_part(scene, rng), sample_style(rng))


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device: str, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor_images(images[i:i + batch]).to(device)).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def validation_scores(folder: Path, n: int, steps: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Attribute accuracy (evaluator) of the edge and the cloud on `n` validation final prompts."""
    from ..bench.harness import generated_attribute_accuracy
    from ..models import load_pair
    from ..world import generate_sessions

    pair = load_pair(edge=str(folder / "edge"), cloud=str(folder / "cloud"), device=device)
    prompts = [s["rounds"][-1]["prompt"] for s in generate_sessions(n, "validation")]
    out: dict[str, Any] = {"n_prompts": n, "steps": steps}
    for role, engine in (("edge", pair.edge), ("cloud", pair.cloud)):
        accuracy = generated_attribute_accuracy(engine, prompts, steps=steps, seed=seed, desc=f"check {role}")
        out[role] = {"attribute_accuracy": accuracy["mean"], "per_attribute": accuracy["per_attribute"]}
    out["combined"] = (out["edge"]["attribute_accuracy"] + out["cloud"]["attribute_accuracy"]) / 2
    return out


@torch.no_grad()
def curve_point(parts: dict[str, Any], emas: dict[str, EMA], prompts: list[str], steps: int) -> dict[str, float]:
    """Attribute accuracy of the averaged (EMA) edge and cloud on `prompts`: one learning-curve point."""
    import copy

    from ..bench.harness import generated_attribute_accuracy
    from ..engine import Engine

    text = copy.deepcopy(parts["text_encoder"])
    emas["text_encoder"].copy_to(text)
    point = {}
    for role in ("edge", "cloud"):
        unet = copy.deepcopy(parts[role])
        emas[role].copy_to(unet)
        engine = Engine(unet=unet, vae=copy.deepcopy(parts["vae"]), text_encoder=text, tokenizer=parts["tokenizer"],
                        scheduler_config=parts["scheduler"].config, name=f"{role}:training")
        point[role] = generated_attribute_accuracy(engine, prompts, steps=steps, desc=f"curve {role}")["mean"]
    return point


# ---------------------------------------------------------------- export


def export_distilled(source: Path, dest: Path, parts: dict[str, Any], summary: dict) -> Path:
    """The source pair's folders with the trained U-Nets (fp16) and text encoder, and pair.json."""
    from diffusers import StableDiffusionPipeline

    staging = dest.with_name(dest.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for role in ("edge", "cloud"):
        unet = parts[role]
        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            unet=unet.half(), scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(staging / role), safe_serialization=True)
        unet.float()
    pair = json.loads((source / "pair.json").read_text()) if (source / "pair.json").exists() else {}
    history = [*pair.get("continued_training", []), summary]
    pair.update({"name": "embedded", "trained": True, "shared_latent_space": True, "height": 64, "width": 64,
                 "unet_weights_dtype": "float16", "continued_training": history})
    (staging / "pair.json").write_text(json.dumps(pair, indent=2))
    if dest.exists():
        for role in ("edge", "cloud"):
            shutil.rmtree(dest / role, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        shutil.move(str(item), str(dest / item.name))
    staging.rmdir()
    return dest


# ---------------------------------------------------------------- training


def distill_pair(
    out_dir: str | Path,
    *,
    resume_from: str | Path = "shipped",
    export_to: str | Path | None = None,
    budget_minutes: float | None = None,
    config: DistillConfig | None = None,
    device: str = "cpu",
    keep: str = "improved",
    progress: bool = True,
) -> dict[str, Any]:
    """Continue training the pair in `resume_from` (see the module docstring) and export it to
    `export_to` (default: back where it came from) when it passed the validation check.

    `out_dir` holds the checkpoint (``distill/ckpt``) and the loss log (``logs/distill.jsonl``);
    rerunning with the same folder resumes. `budget_minutes` fits the step count to the wall
    clock (training until 90% of it; the check and the export take the rest).
    """
    if keep not in KEEP_POLICIES:
        raise InvalidInputError(f"--keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: no CUDA GPU is visible to PyTorch here; use --device cpu")
    if budget_minutes is not None and budget_minutes <= 0:
        raise InvalidInputError(f"--budget-minutes must be positive, got {budget_minutes}")
    cfg = config or default_config(device)
    source = resolve_source(resume_from)
    dest = Path(export_to) if export_to else source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_file = out / "distill_run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {"t0": t0, "budget_minutes": budget_minutes}
    run_file.write_text(json.dumps(run))
    deadline = None if run["budget_minutes"] is None else run["t0"] + 60 * run["budget_minutes"] * 0.9

    torch.manual_seed(cfg.seed)
    parts = _load_components(source, device)
    tok, text, vae, sched = parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["scheduler"]
    cloud, edge = parts["cloud"], parts["edge"]
    rng = np.random.default_rng([cfg.seed, 1])
    scenes = training_scenes(rng, cfg.images, cfg)
    digest = scenes_digest(scenes)
    latent_file = out / "distill" / "latents.safetensors"  # the frozen VAE's encodings, kept for resumes
    cached_digest = None
    if latent_file.exists():
        with safe_open(str(latent_file), "pt") as f:
            cached_digest = (f.metadata() or {}).get("scenes")
    if cached_digest == digest:
        cached = load_file(str(latent_file), device=str(device))
        mean, std = cached["mean"], cached["std"]
    else:
        images = render_all(scenes, rng, workers=cfg.render_workers)
        mean, std = encode_images(vae, images, device)
        latent_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mean": mean.cpu().contiguous(), "std": std.cpu().contiguous()}, str(latent_file),
                  metadata={"scenes": digest})
    scaling = vae.config.scaling_factor
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    empty_ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids

    def encode(captions: list[str]) -> torch.Tensor:
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return text(ids.to(device))[0]

    probe = torch.zeros(1, *mean.shape[1:], device=device)
    with torch.no_grad():
        probe_cond = text(empty_ids.to(device))[0]
    projections = feature_projections(edge, cloud, probe, torch.tensor([500], device=device), probe_cond).to(device)
    opt_cloud = adamw([{"params": cloud.parameters(), "lr": cfg.lr_cloud},
                       {"params": text.parameters(), "lr": cfg.lr_text}], cfg.lr_cloud, 0.01, device)
    opt_edge = adamw([*edge.parameters(), *projections.parameters()], cfg.lr_edge, 0.01, device)
    ema_cloud, ema_edge, ema_text = EMA(cloud, cfg.ema_decay), EMA(edge, cfg.ema_decay), EMA(text, cfg.ema_decay)
    modules = {"cloud": cloud, "edge": edge, "text_encoder": text, "projections": projections}
    ck = Checkpoint(out / "distill" / "ckpt")
    state: dict[str, Any] = {"step": 0, "total": cfg.steps}
    saved_emas = {"ema_cloud": ema_cloud, "ema_edge": ema_edge, "ema_text": ema_text}
    if ck.exists():
        state = ck.load(modules, opt_edge, optimizers={"opt_cloud": opt_cloud}, emas=saved_emas)
    if state.get("done"):
        summary = state["summary"]
        return summary
    # Phase 2 steps cost about a third of phase 1's (PHASE2_COST): the step count that fits the
    # deadline depends on which phase the measured steps were in and on how many of each are left.
    share = cfg.cloud_share

    def project(step: int, seconds_left: float, seconds_per_step: float) -> float:
        in_phase1 = phase_switch is None and step < share * budget.total
        unit = seconds_per_step if in_phase1 else seconds_per_step / PHASE2_COST  # seconds of a phase-1 step
        units = seconds_left / unit
        if in_phase1:  # (share*T - step) phase-1 steps + (1-share)*T phase-2 steps fit in `units`
            return (units + step) / (share + PHASE2_COST * (1 - share))
        return step + units / PHASE2_COST

    budget = StepBudget(state["total"], deadline, locked=state.get("locked", False), project=project,
                        measure_after=cfg.budget_measure_steps, cap=cfg.steps)
    bar = tqdm(total=budget.total, initial=state["step"], desc="distill", disable=not progress, mininterval=5.0,
               dynamic_ncols=True)
    loop = StageLoop(budget, state, bar, LossLog(out / "logs" / "distill.jsonl"), ck, log_every=cfg.log_every,
                     ckpt_every=cfg.ckpt_every)
    taps = FeatureTap(edge), FeatureTap(cloud)
    emas = {"cloud": ema_cloud, "edge": ema_edge, "text_encoder": ema_text}
    curve = LossLog(out / "logs" / "curve.jsonl")
    from ..world import generate_sessions

    curve_prompts = [s["rounds"][-1]["prompt"] for s in generate_sessions(cfg.curve_prompts, "validation")]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.autocast_bf16 and device.startswith("cuda"))
    running: dict[str, float] = {}
    phase_switch = None

    def save_checkpoint(extra: dict) -> None:
        ck.save(extra, modules, opt_edge, optimizers={"opt_cloud": opt_cloud}, emas=saved_emas)

    while loop.running:
        step = loop.step
        # Once phase 2 began it stays: a budget raised later lengthens phase 2, it does not
        # unfreeze the teacher the edge is learning from.
        teacher_trains = phase_switch is None and step < cfg.cloud_share * budget.total
        if not teacher_trains and phase_switch is None:
            phase_switch = step
            # The frozen teacher is the averaged one, the model that ships.
            ema_cloud.copy_to(cloud)
            ema_text.copy_to(text)
        cloud.train(teacher_trains)
        text.train(teacher_trains)
        srng = np.random.default_rng([cfg.seed, 14, step])
        g = torch.Generator().manual_seed(int(srng.integers(2**62)))
        idx = srng.choice(len(scenes), size=min(cfg.batch, len(scenes)), replace=False)
        captions = ["" if srng.random() < cfg.cfg_dropout else training_caption(scenes[i], srng) for i in idx]
        index = torch.from_numpy(idx).to(device)
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=g).to(device)) * scaling
        t_cpu = sample_timesteps(len(idx), sched.config.num_train_timesteps, cfg.high_noise_share, g)
        t = t_cpu.to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        zt = sched.add_noise(z0, noise, t)
        weight = (torch.clamp(snr[t_cpu], max=cfg.min_snr_gamma) / snr[t_cpu]).to(device)
        frac = budget.total * (cfg.cloud_share if teacher_trains else 1.0)
        start = 0 if teacher_trains else (phase_switch or 0)
        for pg, base in zip(opt_cloud.param_groups, (cfg.lr_cloud, cfg.lr_text)):
            pg["lr"] = cosine_lr(step, int(frac), base, warmup=min(cfg.warmup, int(frac) // 10 + 1))
        for pg in opt_edge.param_groups:
            pg["lr"] = cosine_lr(step - start, budget.total - start, cfg.lr_edge,
                                 warmup=min(cfg.warmup, budget.total // 10 + 1) if start == 0 else 1)
        with torch.set_grad_enabled(teacher_trains), autocast:
            cond = encode(captions)
            teacher = cloud(zt, t, encoder_hidden_states=cond).sample
        teacher_features = taps[1].take()
        record: dict[str, float] = {}
        if teacher_trains:
            per = ((teacher.float() - noise) ** 2).mean(dim=(1, 2, 3))
            loss_cloud = (per * weight).mean()
            opt_cloud.zero_grad(set_to_none=True)
            loss_cloud.backward()
            torch.nn.utils.clip_grad_norm_([*cloud.parameters(), *text.parameters()], 1.0)
            opt_cloud.step()
            ema_cloud.update(cloud, step)
            ema_text.update(text, step)
            record["cloud_mse"] = per.mean().item()
        with autocast:
            student = edge(zt, t, encoder_hidden_states=cond.detach()).sample
        student_features = taps[0].take()
        data = ((student.float() - noise) ** 2).mean(dim=(1, 2, 3))
        kd_out = ((student.float() - teacher.detach().float()) ** 2).mean(dim=(1, 2, 3))
        kd_feat = feature_loss(student_features, teacher_features, projections)
        loss_edge = (cfg.data_weight * data * weight).mean() + cfg.kd_output * (kd_out * weight).mean() \
            + cfg.kd_feature * kd_feat
        opt_edge.zero_grad(set_to_none=True)
        loss_edge.backward()
        torch.nn.utils.clip_grad_norm_([*edge.parameters(), *projections.parameters()], 1.0)
        opt_edge.step()
        ema_edge.update(edge, step)
        record.update(edge_mse=data.mean().item(), kd_output=kd_out.mean().item(), kd_feature=kd_feat.item())
        for k, v in record.items():
            running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
        if loop.advance():
            loop.write_log({k: f"{v:.4f}" for k, v in running.items()}, phase=1 if teacher_trains else 2,
                           **record, **{f"{k}_ema": v for k, v in running.items()})
        if cfg.curve_every and (loop.step % cfg.curve_every == 0 or loop.step == 1):
            point = curve_point(parts, emas, curve_prompts, cfg.curve_steps)
            curve.write(step=loop.step, samples=loop.step * cfg.batch, phase=1 if teacher_trains else 2,
                        edge=point["edge"], cloud=point["cloud"], wall_s=loop.wall_s)
            tqdm.write(f"step {loop.step}: validation attribute accuracy edge {point['edge']:.3f}, "
                       f"cloud {point['cloud']:.3f}")
        if loop.step % cfg.ckpt_every == 0 and loop.running:
            save_checkpoint({"step": loop.step, "total": budget.total, "locked": budget.locked,
                             "wall_s": loop.wall_s, "phase_switch": phase_switch})
    loop.bar.close()
    for tap in taps:
        tap.close()
    for ema, module in ((ema_cloud, cloud), (ema_edge, edge), (ema_text, text)):
        ema.copy_to(module)
    for module in (cloud, edge, text):
        module.eval()
    train_wall = loop.wall_s
    samples = loop.step * cfg.batch
    cloud_steps = loop.step if phase_switch is None else phase_switch  # 0 when the cloud never trained
    summary: dict[str, Any] = {
        "from": str(resume_from), "steps": loop.step, "cloud_steps": cloud_steps,
        "batch": cfg.batch, "samples": samples, "train_wall_s": train_wall,
        "samples_per_s": samples / max(train_wall, 1e-9), "final": {k: v for k, v in running.items()},
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(), "config": asdict(cfg),
    }
    candidate = out / "candidate"
    export_distilled(source, candidate, parts, summary)
    before = validation_scores(source, cfg.eval_prompts, cfg.eval_steps, device)
    after = validation_scores(candidate, cfg.eval_prompts, cfg.eval_steps, device)
    improved = after["combined"] > before["combined"]
    summary.update(validation_before=before, validation_after=after, improved=improved,
                   kept=improved or keep == "always", wall_s=time.time() - run["t0"])
    if summary["kept"]:
        export_distilled(source, dest, parts, summary)
    save_checkpoint({"step": loop.step, "total": budget.total, "locked": True, "done": True, "summary": summary,
                     "wall_s": train_wall})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


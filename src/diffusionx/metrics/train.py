"""Training and self-check of the embedded evaluator (`diffusionx train evaluator`).

Data: scenes from `world.random_scene`, rendered with jitter, with paraphrased captions.
Loss: symmetric contrastive (CLIP) loss, with one hard-negative caption per image (the same
scene with one attribute changed), plus per-grid-cell attribute losses (presence, shape,
color, size) and a background loss. Seeds are the evaluator's own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .evaluator import (
    ASSET_DIR,
    WEIGHTS_NAME,
    Evaluator,
    default_weights_path,
    images_to_tensor,
)
from .model import N_CELLS, EvaluatorConfig, EvaluatorNet
from .text import WordTokenizer

TRAIN_SEED = 31_415  # scenes, captions and init of the evaluator (never the generators')
VAL_SEED = 27_182  # validation during training
REPORT_SEED = 16_180  # held-out renders of the self-check
BASE_STEPS = 1000
BATCH = 128
N_HARD = 64  # hard-negative captions per batch
BASE_POOL = 20_000
LR = 2e-3


# ------------------------------------------------------------------------------ data
def render_scenes(scenes: list[Any], rng: np.random.Generator, progress: bool = False, desc: str = "") -> np.ndarray:
    from tqdm.auto import tqdm

    from ..world import render

    out = np.empty((len(scenes), 64, 64, 3), dtype=np.uint8)
    for i, scene in enumerate(tqdm(scenes, desc=desc, disable=not progress, leave=False)):
        out[i] = render(scene, size=64, rng=rng)
    return out


def split_scenes(rng: np.random.Generator, n: int, split: str) -> list[Any]:
    """`n` random scenes whose content belongs to the world's `split` ("train" /
    "validation" / "test"); the evaluator trains on "train" only."""
    from ..world import random_scene, scene_split

    out: list[Any] = []
    while len(out) < n:
        scene = random_scene(rng)
        if scene_split(scene) == split:
            out.append(scene)
    return out


def perturb_scene(scene: Any, rng: np.random.Generator) -> Any:
    """The same scene with one thing changed: an object's shape / color / size / position,
    the background, two objects' colors swapped, or an object removed."""
    from ..world.vocab import COLORS, POSITIONS, SHAPES, SIZES

    objects = list(scene.objects)
    kinds = ["shape", "color", "size", "position", "background"]
    if len(objects) > 1:
        kinds += ["swap", "remove"]
    kind = kinds[rng.integers(len(kinds))]
    if kind == "background":
        choices = [c for c in COLORS if c != scene.background]
        return dataclasses.replace(scene, background=choices[rng.integers(len(choices))])
    if kind == "remove":
        del objects[rng.integers(len(objects))]
        return dataclasses.replace(scene, objects=tuple(objects))
    if kind == "swap":
        i, j = rng.choice(len(objects), 2, replace=False)
        if objects[i].color != objects[j].color:
            ci, cj = objects[i].color, objects[j].color
            objects[i] = dataclasses.replace(objects[i], color=cj)
            objects[j] = dataclasses.replace(objects[j], color=ci)
            return dataclasses.replace(scene, objects=tuple(objects))
        kind = "color"
    k = rng.integers(len(objects))
    obj = objects[k]
    if kind == "position":
        used = {o.position for o in objects}
        choices = [p for p in POSITIONS if p not in used]
    else:
        vocab = {"shape": SHAPES, "color": COLORS, "size": SIZES}[kind]
        choices = [v for v in vocab if v != getattr(obj, kind)]
    if kind == "color":
        choices = [c for c in choices if c != scene.background] or choices
    objects[k] = dataclasses.replace(obj, **{kind: choices[rng.integers(len(choices))]})
    return dataclasses.replace(scene, objects=tuple(objects))


def scene_targets(scenes: list[Any]) -> dict[str, np.ndarray]:
    from ..world.vocab import COLORS, POSITIONS, SHAPES, SIZES

    n = len(scenes)
    t = {k: np.zeros((n, N_CELLS), np.int64) for k in ("present", "shape", "color", "size")}
    t["background"] = np.zeros(n, np.int64)
    for i, scene in enumerate(scenes):
        t["background"][i] = COLORS.index(scene.background)
        for obj in scene.objects:
            c = POSITIONS.index(obj.position)
            t["present"][i, c] = 1
            t["shape"][i, c] = SHAPES.index(obj.shape)
            t["color"][i, c] = COLORS.index(obj.color)
            t["size"][i, c] = SIZES.index(obj.size)
    return t


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild noise and blur, so generated (imperfect) images stay in distribution."""
    b = x.shape[0]
    blur = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    mix = (torch.rand(b, 1, 1, 1, generator=gen) < 0.2).float() * torch.rand(b, 1, 1, 1, generator=gen)
    x = x * (1 - mix) + blur * mix
    sigma = (torch.rand(b, 1, 1, 1, generator=gen) < 0.4).float() * 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------ losses
def _losses(
    net: EvaluatorNet, images: torch.Tensor, texts: torch.Tensor, negs: torch.Tensor, targets: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    _, img_e, attr = net.image(images)
    width = max(texts.shape[1], negs.shape[1])
    texts, negs = (F.pad(t, (0, width - t.shape[1])) for t in (texts, negs))
    txt_all = net.normalize(net.text(torch.cat([texts, negs])))
    img_e = net.normalize(img_e)
    b = images.shape[0]
    txt_e = txt_all[:b]
    scale = net.logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(b)
    clip = (F.cross_entropy(scale * img_e @ txt_all.T, labels) + F.cross_entropy(scale * txt_e @ img_e.T, labels)) / 2
    parts = net.split_attr(attr)
    present = targets["present"].bool()
    attr_loss = F.binary_cross_entropy_with_logits(parts["present"], targets["present"].float()) * 3.0
    for key in ("shape", "color", "size"):
        attr_loss = attr_loss + F.cross_entropy(parts[key][present], targets[key][present])
    attr_loss = attr_loss + F.cross_entropy(parts["background"], targets["background"])
    return {"loss": clip + attr_loss, "clip": clip, "attr": attr_loss}


# ------------------------------------------------------------------------------ training
def train_evaluator(
    out_dir: str | Path | None = None,
    *,
    steps_scale: float = 1.0,
    progress: bool = True,
    seed: int = TRAIN_SEED,
    report: bool = True,
    batch_size: int = BATCH,
) -> Path:
    """Train the evaluator from scratch and save `evaluator.safetensors` (+ `report.json`,
    `train_log.jsonl`) in `out_dir` (default: the shipped asset folder). Returns the weights path.

    `steps_scale` scales steps and the rendered pool (e.g. 0.0 with a small `batch_size` for
    a smoke test: two steps)."""
    from tqdm.auto import tqdm

    from ..world import caption

    out = Path(out_dir) if out_dir is not None else ASSET_DIR
    out.mkdir(parents=True, exist_ok=True)
    steps = max(2, round(BASE_STEPS * steps_scale))
    pool_size = max(2 * batch_size, round(BASE_POOL * steps_scale))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()

    scenes = split_scenes(rng, pool_size, "train")
    pool = render_scenes(scenes, rng, progress, desc="evaluator: rendering scenes")
    targets = scene_targets(scenes)
    tokenizer = WordTokenizer.build(caption(s, rng) for s in scenes[:4000] for _ in range(2))
    cfg = EvaluatorConfig(vocab_size=len(tokenizer))
    net = EvaluatorNet(cfg)
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )

    val_rng = np.random.default_rng(VAL_SEED)
    val_scenes = split_scenes(val_rng, min(256, pool_size), "validation")
    val_images = render_scenes(val_scenes, val_rng)
    val_captions = [caption(s, val_rng) for s in val_scenes]

    log_file = (out / "train_log.jsonl").open("w")
    bar = tqdm(range(steps), desc="evaluator: training", disable=not progress)
    net.train()
    for step in bar:
        idx = rng.integers(pool_size, size=batch_size)
        batch_scenes = [scenes[i] for i in idx]
        texts = tokenizer.encode([caption(s, rng) for s in batch_scenes])
        hard = batch_scenes[: min(N_HARD, batch_size)]
        negs = tokenizer.encode([caption(perturb_scene(s, rng), rng) for s in hard])
        images = _augment(images_to_tensor(pool[idx]), gen)
        tgt = {k: torch.from_numpy(v[idx]) for k, v in targets.items()}
        losses = _losses(net, images, torch.from_numpy(texts), torch.from_numpy(negs), tgt)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        opt.step()
        sched.step()
        record: dict[str, Any] = {"step": step + 1, **{k: round(v.item(), 4) for k, v in losses.items()}}
        if (step + 1) % 250 == 0 or step + 1 == steps:
            net.eval()
            ev = Evaluator(net, tokenizer)
            record["val_retrieval_top1"] = retrieval_top1(ev, val_images, val_captions)
            record["val_attribute_accuracy"] = ev.attribute_accuracy_scenes(val_images, val_scenes)["mean"]
            net.train()
        if (step + 1) % 10 == 0 or "val_retrieval_top1" in record:
            record["elapsed_s"] = round(time.time() - t0, 1)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            bar.set_postfix({k: v for k, v in record.items() if k not in ("step", "elapsed_s", "loss")})
    log_file.close()
    net.eval()
    evaluator = Evaluator(net, tokenizer)
    path = evaluator.save(out / WEIGHTS_NAME)
    if report:
        # evaluate the saved (fp16-stored) weights, exactly what ships
        evaluator_report(
            Evaluator.load(path),
            out_path=out / "report.json",
            progress=progress,
            extra={
                "train_seconds": round(time.time() - t0, 1),
                "train_steps": steps,
                "batch_size": batch_size,
                "pool_size": pool_size,
            },
        )
    return path


# ------------------------------------------------------------------------------ self-check
def retrieval_top1(ev: Evaluator, images: np.ndarray, captions: list[str], group: int = 32) -> float:
    """Image -> caption top-1 accuracy among `group` candidates (the group's own captions)."""
    sims = ev.similarity(images, captions)
    hits = []
    for start in range(0, len(captions) - group + 1, group):
        block = sims[start : start + group, start : start + group]
        hits.extend(block.argmax(axis=1) == np.arange(group))
    return float(np.mean(hits))


def evaluator_report(
    evaluator: Evaluator | None = None,
    *,
    n: int = 1024,
    seed: int = REPORT_SEED,
    out_path: str | Path | None = "default",
    progress: bool = False,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Self-check on fresh held-out renders (test-split scenes, own seed): caption retrieval
    top-1 among 32 and attribute accuracy (both should be >= 0.95). Written to `out_path` (default: report.json next to
    the shipped weights; None: not written)."""
    from ..world import caption

    ev = evaluator or Evaluator.load()
    rng = np.random.default_rng(seed)
    scenes = split_scenes(rng, n, "test")
    images = render_scenes(scenes, rng, progress, desc="evaluator: held-out renders")
    captions = [caption(s, rng) for s in scenes]
    wrong = [caption(perturb_scene(s, rng), rng) for s in scenes]
    sims = ev.similarity(images, captions)
    t2i = []
    for start in range(0, n - 31, 32):
        block = sims[start : start + 32, start : start + 32]
        t2i.extend(block.argmax(axis=0) == np.arange(32))
    own = ev.clip_score(images, captions)
    other = ev.clip_score(images, wrong)
    shuffled = ev.clip_score(images, captions[1:] + captions[:1])
    attr = ev.attribute_accuracy(images, captions)
    attr_scene = ev.attribute_accuracy_scenes(images, scenes)
    ref_rng = np.random.default_rng(seed + 1)
    ref_images = render_scenes(split_scenes(ref_rng, n, "test"), ref_rng)
    report: dict[str, Any] = {
        "n_held_out": n,
        "seed": seed,
        "retrieval_top1_among_32": retrieval_top1(ev, images, captions),
        "text_to_image_top1_among_32": float(np.mean(t2i)),
        "attribute_accuracy": attr["mean"],
        "attribute_accuracy_per_check": attr["per_attribute"],
        "attribute_exact_match": attr["exact"],
        "attribute_accuracy_from_scene_graphs": attr_scene["mean"],
        "n_unparseable_captions": attr["n_unparseable"],
        "hard_negative_pairwise_accuracy": float(np.mean(own > other)),
        "clip_score_own_caption": float(own.mean()),
        "clip_score_one_attribute_changed": float(other.mean()),
        "clip_score_random_caption": float(shuffled.mean()),
        "fid_between_two_render_sets": ev.fid(images, ref_images),
        "feature_dim": int(ev.net.cfg.feature_dim),
        "params": int(sum(p.numel() for p in ev.net.parameters())),
    }
    report["passes"] = bool(report["retrieval_top1_among_32"] >= 0.95 and (attr["mean"] or 0) >= 0.95)
    report.update(extra or {})
    if out_path == "default":
        out_path = default_weights_path().parent / "report.json"
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=2) + "\n")
    return report

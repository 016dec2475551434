"""Rebuild the embedded edge/cloud model pair from scratch, on the CPU or a GPU, with a fixed seed.

Stages (each resumable; its checkpoint and final weights live under ``out_dir/<stage>/`` and its
losses in ``out_dir/logs/<stage>.jsonl``):

1. ``text_encoder``: a `CLIPTextModel` trained as the text tower of a small contrastive (CLIP-loss)
   image-text model on rendered scenes and captions, with hard negatives (the same scene with
   one attribute changed), so its features separate the vocabulary.
2. ``vae``: an `AutoencoderKL` (64x64 -> 16x16x4), MSE + L1 + a small KL; its ``scaling_factor``
   is set to 1 / std of the training latents. Reports PSNR on test-split scenes.
3. ``cache``: VAE latent distributions and text-encoder hidden states of the training scenes.
4. ``unet_edge`` / ``unet_cloud``: two `UNet2DConditionModel` (about 1M and 11M parameters),
   epsilon prediction under the DDIM schedule of ``configs/embedded_scheduler.json``, 10% caption
   dropout for classifier-free guidance, AdamW + cosine LR + EMA, min-SNR loss weighting.
   Both see the same batches; they train as two parallel one-thread processes.
5. export: two `StableDiffusionPipeline` folders (``edge/``, ``cloud/``) and ``pair.json``.

Run: ``diffusionx train embedded --out runs/embedded [--budget-minutes 120] [--device cuda]``
(``diffusionx train embedded`` takes the same options). On CUDA the larger `GPU_CONFIG` applies.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from .common import EMA, Checkpoint, LossLog, StageLoop, StepBudget, adamw, cosine_lr
from .data import captions_for, paired_scenes, render_all, split_scenes, to_tensor_images

SEED = 20260
STAGES = ("text_encoder", "vae", "cache", "unet_edge", "unet_cloud", "export")


@dataclass(frozen=True)
class TrainConfig:
    """Sizes of one full rebuild. `steps_scale` in `train_embedded` scales every step count."""

    seed: int = SEED
    # text encoder (contrastive)
    te_pairs: int = 4000
    te_steps: int = 1200
    te_batch_pairs: int = 32
    te_lr: float = 1e-3
    # VAE
    vae_images: int = 6000
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop_small: int = 16  # the first share of steps uses small random crops (cheap steps) ...
    vae_small_frac: float = 0.6
    vae_crop: int = 32  # ... then larger ones
    vae_full_frac: float = 0.0  # the last share of steps uses whole 64x64 images
    vae_lr: float = 6e-4
    vae_kl_weight: float = 1e-7
    vae_test_images: int = 256
    # VAE decoder refinement (encoder frozen, so latents and U-Nets are unaffected); it runs in the
    # edge U-Net's process once that U-Net is done, until the U-Net stage's deadline.
    refine_decoder: bool = True
    vae_decoder_images: int = 4000
    vae_decoder_steps: int = 3000
    vae_decoder_batch: int = 16
    vae_decoder_lr: float = 6e-4
    vae_decoder_full_frac: float = 0.25  # the last share of steps decodes whole 16x16 latents
    # U-Nets
    unet_images: int = 12000
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr_edge: float = 1e-3
    unet_lr_cloud: float = 7e-4
    unet_warmup: int = 200
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # bookkeeping
    ckpt_every: int = 100
    log_every: int = 10
    budget_measure_steps: int = 8  # steps timed before a deadline fixes a stage's step count
    render_workers: int = 1  # processes that render the training scenes
    unet_fp16: bool = True  # ship U-Net weights in fp16 (they load back as float32)
    edge_matches_cloud_steps: bool = True  # under a time budget the edge U-Net gets the cloud's step count

    def scaled(self, s: float) -> TrainConfig:
        def st(n: int) -> int:
            return max(2, round(n * s))

        return replace(
            self, te_steps=st(self.te_steps), vae_steps=st(self.vae_steps), unet_steps=st(self.unet_steps),
            vae_decoder_steps=st(self.vae_decoder_steps),
            unet_warmup=min(self.unet_warmup, max(1, st(self.unet_steps) // 10)),
        )


# On a GPU the step count, not the data, is cheap: more scenes, bigger batches, upper bounds that the
# time budget cuts down, and a longer timing window (CUDA runs asynchronously; the first steps warm up).
GPU_CONFIG = replace(
    TrainConfig(),
    te_pairs=20000, te_steps=30000, te_batch_pairs=128,
    vae_images=20000, vae_steps=60000, vae_batch=64, vae_crop_small=32, vae_small_frac=0.5, vae_full_frac=0.3,
    vae_decoder_images=20000, vae_decoder_steps=60000, vae_decoder_batch=64,
    unet_images=60000, unet_steps=100000, unet_batch=256, unet_lr_edge=1e-3, unet_lr_cloud=5e-4, unet_warmup=500,
    ckpt_every=2000, log_every=25, budget_measure_steps=100, render_workers=max(1, (os.cpu_count() or 2) - 2),
)


# A few steps of every stage on tiny data: the smoke test, and `--smoke` to check a new machine.
SMOKE_CONFIG = TrainConfig(
    te_pairs=16, te_steps=3, te_batch_pairs=8, vae_images=16, vae_steps=3, vae_batch=4, vae_test_images=4,
    unet_images=16, unet_steps=3, unet_batch=4, ckpt_every=2, log_every=1, vae_decoder_images=16,
    vae_decoder_steps=3, vae_decoder_batch=4,
)


def config_path(name: str) -> Path:
    return Path(str(resources.files("diffusionx") / "configs" / name))


def tokenizer_dir() -> Path:
    return Path(str(resources.files("diffusionx") / "assets" / "tokenizer"))


def default_assets_dir() -> Path:
    return Path(str(resources.files("diffusionx") / "assets" / "embedded"))


def _model_config(name: str) -> dict:
    return {k: v for k, v in json.loads(config_path(name).read_text()).items() if not k.startswith("_")}


def _bar(progress: bool, total: int, initial: int, desc: str, position: int = 0):
    return tqdm(total=total, initial=initial, desc=desc, disable=not progress, position=position,
                mininterval=5.0, dynamic_ncols=True, leave=True)


def _loop(out_dir: Path, stage: str, desc: str, budget: StepBudget, state: dict, ck: Checkpoint, cfg: TrainConfig,
          progress: bool, position: int) -> StageLoop:
    bar = _bar(progress, budget.total, state["step"], desc, position)
    return StageLoop(budget, state, bar, LossLog(out_dir / "logs" / f"{stage}.jsonl"), ck, log_every=cfg.log_every,
                     ckpt_every=cfg.ckpt_every)


def _done(out_dir: Path, stage: str) -> bool:
    return Checkpoint(out_dir / stage / "ckpt").state().get("done", False)


# ---------------------------------------------------------------- stage 1: text encoder


class ImageTower(torch.nn.Module):
    """Small CNN image encoder for the contrastive objective (not shipped). Keeps layout: no pooling."""

    def __init__(self, dim: int = 128):
        super().__init__()
        ch = (32, 64, 96, 128)
        layers: list[torch.nn.Module] = []
        c_in = 3
        for c in ch:
            layers += [torch.nn.Conv2d(c_in, c, 3, stride=2, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU()]
            c_in = c
        self.conv = torch.nn.Sequential(*layers)  # 64 -> 4
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(ch[-1] * 16, 256), torch.nn.SiLU(),
                                        torch.nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir()))


def _new_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**_model_config("embedded_text_encoder.json")))


def train_text_encoder(out_dir: Path, cfg: TrainConfig, *, resume: bool, progress: bool,
                       deadline: float | None = None, position: int = 0, device: str = "cpu") -> dict:
    stage = out_dir / "text_encoder"
    ck = Checkpoint(stage / "ckpt")
    if resume and ck.state().get("done"):
        return ck.state()
    torch.manual_seed(cfg.seed + 1)
    tok = _load_tokenizer()
    text = _new_text_encoder()
    dim = text.config.hidden_size
    proj = torch.nn.Linear(dim, dim, bias=False)
    image = ImageTower(dim)
    dev = torch.device(device)
    text.to(dev), proj.to(dev), image.to(dev)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=dev))
    params = [*text.parameters(), *proj.parameters(), *image.parameters(), logit_scale]
    opt = adamw(params, cfg.te_lr, 0.01, dev)
    holder = torch.nn.ParameterDict({"logit_scale": logit_scale})
    modules = {"text": text, "proj": proj, "image": image, "scale": holder}
    rng = np.random.default_rng([cfg.seed, 1])
    scenes = paired_scenes(rng, cfg.te_pairs)
    images = render_all(scenes, rng, workers=cfg.render_workers)
    state = {"step": 0, "total": cfg.te_steps}
    if resume and ck.exists():
        state = ck.load(modules, opt)
    budget = StepBudget(state["total"], deadline, locked=state.get("locked", False),
                        measure_after=cfg.budget_measure_steps)
    loop = _loop(out_dir, "text_encoder", "text encoder", budget, state, ck, cfg, progress, position)
    n_pairs = len(scenes) // 2
    text.train()
    while loop.running:
        step = loop.step
        srng = np.random.default_rng([cfg.seed, 11, step])
        pairs = srng.choice(n_pairs, size=min(cfg.te_batch_pairs, n_pairs), replace=False)
        idx = np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)
        caps = captions_for([scenes[i] for i in idx], srng)
        ids = tok(caps, padding="longest", truncation=True, max_length=77, return_tensors="pt").to(dev)
        x = to_tensor_images(images[idx]).to(dev)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, budget.total, cfg.te_lr, warmup=min(50, budget.total // 10 + 1))
        t = F.normalize(proj(text(**ids).pooler_output), dim=-1)
        v = F.normalize(image(x), dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * v @ t.T
        labels = torch.arange(len(idx), device=dev)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if loop.advance():
            acc = (logits.argmax(1) == labels).float().mean().item()
            loop.write_log({"loss": f"{loss.item():.3f}", "acc": f"{acc:.2f}"}, loss=loss.item(), retrieval_acc=acc,
                           lr=opt.param_groups[0]["lr"])
        loop.checkpoint(modules, opt)
    loop.bar.close()
    step = loop.step
    # Held-out check: caption -> image retrieval among 32 test-split scenes (with hard negatives).
    text.eval()
    image.eval()
    with torch.no_grad():
        trng = np.random.default_rng([cfg.seed, 99])
        test = paired_scenes(trng, 16, split="test")
        ids = tok(captions_for(test, trng), padding="longest", return_tensors="pt").to(dev)
        t = F.normalize(proj(text(**ids).pooler_output), dim=-1)
        v = F.normalize(image(to_tensor_images(render_all(test, None)).to(dev)), dim=-1)
        test_acc = ((v @ t.T).argmax(0) == torch.arange(len(test), device=dev)).float().mean().item()
    text.save_pretrained(stage / "final", safe_serialization=True)
    final = {"step": step, "total": budget.total, "locked": True, "done": True, "final_loss": loss.item(),
             "test_retrieval_top1_of_32": test_acc, "wall_s": loop.wall_s,
             "params": sum(p.numel() for p in text.parameters())}
    ck.save(final, modules, opt)
    return final


# ---------------------------------------------------------------- stage 2: VAE


def _new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_model_config("embedded_vae.json"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], computed on the uint8 scale."""
    a8 = ((a.clamp(-1, 1) + 1) * 127.5).round()
    b8 = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((a8 - b8) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def vae_test_psnr(vae, n: int, seed: int = SEED) -> float:
    scenes = split_scenes(np.random.default_rng([seed, 77]), n, split="test")
    x = to_tensor_images(render_all(scenes, None)).to(vae.device)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mode()).sample for i in range(0, n, 64)])
    return psnr(rec, x)


def train_vae(out_dir: Path, cfg: TrainConfig, *, resume: bool, progress: bool,
              deadline: float | None = None, position: int = 0, device: str = "cpu") -> dict:
    stage = out_dir / "vae"
    ck = Checkpoint(stage / "ckpt")
    if resume and ck.state().get("done"):
        return ck.state()
    torch.manual_seed(cfg.seed + 2)
    vae = _new_vae().to(device)
    opt = adamw(vae.parameters(), cfg.vae_lr, 0.0, device)
    rng = np.random.default_rng([cfg.seed, 2])
    images = render_all(split_scenes(rng, cfg.vae_images), rng, workers=cfg.render_workers)
    state = {"step": 0, "total": cfg.vae_steps}
    if resume and ck.exists():
        state = ck.load({"vae": vae}, opt)
    ratio = (cfg.vae_crop / cfg.vae_crop_small) ** 2
    cost = cfg.vae_small_frac + (1 - cfg.vae_small_frac) * ratio
    budget = StepBudget(state["total"], deadline, locked=state.get("locked", False), cost_factor=cost,
                        measure_after=cfg.budget_measure_steps)
    loop = _loop(out_dir, "vae", "vae", budget, state, ck, cfg, progress, position)
    vae.train()
    while loop.running:
        step = loop.step
        srng = np.random.default_rng([cfg.seed, 12, step])
        idx = srng.choice(len(images), size=min(cfg.vae_batch, len(images)), replace=False)
        x = to_tensor_images(images[idx]).to(device)
        full = step >= budget.total * (1 - cfg.vae_full_frac)
        crop = cfg.vae_crop_small if step < budget.total * cfg.vae_small_frac else cfg.vae_crop
        if not full and crop < x.shape[-1]:
            # Random crops aligned to the latent grid: cheaper steps, same local statistics.
            n_pos = (x.shape[-1] - crop) // 4 + 1
            oy, ox = (int(v) * 4 for v in srng.integers(0, n_pos, size=2))
            x = x[..., oy:oy + crop, ox:ox + crop]
            if srng.random() < 0.5:
                x = x.flip(-1)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, budget.total, cfg.vae_lr, warmup=min(100, budget.total // 10 + 1))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        l1 = F.l1_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + 0.1 * l1 + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if loop.advance():
            p = psnr(rec.detach(), x)
            loop.write_log({"loss": f"{loss.item():.4f}", "psnr": f"{p:.1f}"}, loss=loss.item(), mse=mse.item(),
                           kl=kl.item(), psnr=p, full=bool(full), lr=opt.param_groups[0]["lr"])
        loop.checkpoint({"vae": vae}, opt)
    loop.bar.close()
    step = loop.step
    vae.eval()
    with torch.no_grad():
        test_psnr = vae_test_psnr(vae, cfg.vae_test_images, cfg.seed)
        x = to_tensor_images(images[: min(2048, len(images))]).to(device)
        z = torch.cat([vae.encode(x[i:i + 128]).latent_dist.sample() for i in range(0, len(x), 128)])
        scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(stage / "final", safe_serialization=True)
    final = {"step": step, "total": budget.total, "locked": True, "done": True, "final_loss": loss.item(),
             "test_psnr_db": test_psnr, "scaling_factor": scaling, "wall_s": loop.wall_s,
             "params": sum(p.numel() for p in vae.parameters())}
    ck.save(final, {"vae": vae}, opt)
    return final


# ---------------------------------------------------------------- stage 3: latent / text cache


def load_text_encoder(out_dir: Path):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(str(out_dir / "text_encoder" / "final")).eval()


def load_vae(out_dir: Path):
    """The run's VAE: with the refined decoder once that stage is done."""
    from diffusers import AutoencoderKL

    refined = out_dir / "vae_decoder" / "final"
    folder = refined if refined.exists() else out_dir / "vae" / "final"
    return AutoencoderKL.from_pretrained(str(folder)).eval()


def refine_vae_decoder(out_dir: Path, cfg: TrainConfig, *, resume: bool, progress: bool,
                       deadline: float | None = None, position: int = 0, device: str = "cpu") -> dict:
    """Train the VAE decoder further with the encoder frozen (latents, hence U-Nets, are unchanged)."""
    from diffusers import AutoencoderKL

    stage = out_dir / "vae_decoder"
    ck = Checkpoint(stage / "ckpt")
    if resume and ck.state().get("done"):
        return ck.state()
    torch.manual_seed(cfg.seed + 6)
    vae = AutoencoderKL.from_pretrained(str(out_dir / "vae" / "final")).to(device)
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = adamw(trainable, cfg.vae_decoder_lr, 0.0, device)
    rng = np.random.default_rng([cfg.seed, 6])
    images = render_all(split_scenes(rng, cfg.vae_decoder_images), rng, workers=cfg.render_workers)
    with torch.no_grad():
        vae.eval()
        dists = [vae.encode(to_tensor_images(images[i:i + 128]).to(device)).latent_dist
                 for i in range(0, len(images), 128)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    state = {"step": 0, "total": cfg.vae_decoder_steps}
    if resume and ck.exists():
        state = ck.load({"vae": vae}, opt)
    cost = (1 - cfg.vae_decoder_full_frac) + cfg.vae_decoder_full_frac * 4
    budget = StepBudget(state["total"], deadline, locked=state.get("locked", False), cost_factor=cost,
                        measure_after=cfg.budget_measure_steps)
    if deadline is not None and time.time() > deadline - 60:
        budget = StepBudget(state["step"], None)  # no time left: keep the decoder as it is
    loop = _loop(out_dir, "vae_decoder", "vae decoder", budget, state, ck, cfg, progress, position)
    vae.decoder.train()
    loss = torch.tensor(float("nan"))
    while loop.running:
        step = loop.step
        srng = np.random.default_rng([cfg.seed, 16, step])
        g = torch.Generator().manual_seed(int(srng.integers(2**62)))
        idx = srng.choice(len(images), size=min(cfg.vae_decoder_batch, len(images)), replace=False)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g).to(device)
        x = to_tensor_images(images[idx]).to(device)
        if step < budget.total * (1 - cfg.vae_decoder_full_frac):
            oy, ox = (int(v) for v in srng.integers(0, 9, size=2))  # 8x8 latent crop = 32x32 pixels
            z = z[..., oy:oy + 8, ox:ox + 8]
            x = x[..., 4 * oy:4 * oy + 32, 4 * ox:4 * ox + 32]
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, budget.total, cfg.vae_decoder_lr, warmup=min(20, budget.total // 10 + 1))
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if loop.advance():
            p = psnr(rec.detach(), x)
            loop.write_log({"loss": f"{loss.item():.4f}", "psnr": f"{p:.1f}"}, loss=loss.item(), psnr=p,
                           lr=opt.param_groups[0]["lr"])
        loop.checkpoint({"vae": vae}, opt)
    loop.bar.close()
    step = loop.step
    vae.eval()
    test_psnr = vae_test_psnr(vae, cfg.vae_test_images, cfg.seed)
    base = Checkpoint(out_dir / "vae" / "ckpt").state().get("test_psnr_db", -1.0)
    if test_psnr > base:
        vae.save_pretrained(stage / "final", safe_serialization=True)
    final = {"step": step, "total": budget.total, "locked": True, "done": True, "final_loss": loss.item(),
             "test_psnr_db": test_psnr, "test_psnr_db_before": base, "used": test_psnr > base,
             "wall_s": loop.wall_s}
    ck.save(final, {"vae": vae}, opt)
    return final


@torch.no_grad()
def encode_prompts(tok, text_encoder, prompts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        ids = tok(prompts[i:i + batch], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0].cpu())
    return torch.cat(out)


def build_cache(out_dir: Path, cfg: TrainConfig, *, resume: bool, progress: bool, device: str = "cpu") -> dict:
    path = out_dir / "cache" / "cache.safetensors"
    meta_path = out_dir / "cache" / "cache.json"
    if resume and path.exists() and meta_path.exists():
        return json.loads(meta_path.read_text())
    t0 = time.time()
    rng = np.random.default_rng([cfg.seed, 3])
    scenes = split_scenes(rng, cfg.unet_images)
    images = render_all(scenes, rng, workers=cfg.render_workers)
    prompts = captions_for(scenes, rng)
    tok, te, vae = _load_tokenizer(), load_text_encoder(out_dir).to(device), load_vae(out_dir).to(device)
    means, stds, embs = [], [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(scenes), 128), desc="cache", disable=not progress, mininterval=5.0):
            d = vae.encode(to_tensor_images(images[i:i + 128]).to(device)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
            embs.append(encode_prompts(tok, te, prompts[i:i + 128]).half())
        empty = encode_prompts(tok, te, [""])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
               "text": torch.cat(embs).contiguous(), "empty": empty.contiguous()}, str(path))
    meta = {"n": len(scenes), "scaling_factor": vae.config.scaling_factor, "wall_s": time.time() - t0}
    (out_dir / "cache" / "prompts.json").write_text(json.dumps(prompts))
    meta_path.write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------- stage 4: U-Nets


def _new_unet(role: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_model_config(f"embedded_unet_{role}.json"))


def new_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(json.loads(config_path("embedded_scheduler.json").read_text()))


def train_unet(out_dir: Path, cfg: TrainConfig, role: str, *, resume: bool, progress: bool,
               deadline: float | None = None, position: int = 0, threads: int | None = None,
               device: str = "cpu") -> dict:
    if threads:
        torch.set_num_threads(threads)
    stage = out_dir / f"unet_{role}"
    ck = Checkpoint(stage / "ckpt")
    if resume and ck.state().get("done"):
        result = ck.state()
    else:
        result = _train_unet(out_dir, cfg, role, resume=resume, progress=progress, deadline=deadline,
                             position=position, device=device)
    if role == "edge" and cfg.refine_decoder:
        # The edge U-Net finishes first; its process spends the rest of the stage on the VAE decoder.
        refine_vae_decoder(out_dir, cfg, resume=resume, progress=progress, deadline=deadline, position=position,
                           device=device)
    return result


def _cloud_total(out_dir: Path, timeout_s: float = 3600.0) -> int:
    path = out_dir / "unet_cloud" / "budget.json"
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"the cloud U-Net never fixed its step count ({path})")
        time.sleep(2.0)
    return int(json.loads(path.read_text())["total"])


def _train_unet(out_dir: Path, cfg: TrainConfig, role: str, *, resume: bool, progress: bool,
                deadline: float | None, position: int, device: str = "cpu") -> dict:
    stage = out_dir / f"unet_{role}"
    ck = Checkpoint(stage / "ckpt")
    torch.manual_seed(cfg.seed + (4 if role == "edge" else 5))
    unet = _new_unet(role).to(device)
    base_lr = cfg.unet_lr_edge if role == "edge" else cfg.unet_lr_cloud
    opt = adamw(unet.parameters(), base_lr, 0.01, device)
    ema = EMA(unet, cfg.ema_decay)
    cache = load_file(str(out_dir / "cache" / "cache.safetensors"))
    scaling = json.loads((out_dir / "cache" / "cache.json").read_text())["scaling_factor"]
    mean, std, text = cache["mean"].to(device), cache["std"].to(device), cache["text"].to(device)
    empty = cache["empty"].float().to(device)
    n = len(mean)
    sched = new_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    state = {"step": 0, "total": cfg.unet_steps}
    if resume and ck.exists():
        state = ck.load({"unet": unet}, opt, ema)
    budget = StepBudget(state["total"], deadline, locked=state.get("locked", False),
                        measure_after=cfg.budget_measure_steps)
    match = role == "edge" and cfg.edge_matches_cloud_steps and deadline is not None
    if match and not budget.locked:
        # Same data for both U-Nets: the edge takes the step count the cloud can afford.
        budget = StepBudget(_cloud_total(out_dir), None)
    budget_file = stage / "budget.json"

    def publish() -> None:
        if role != "cloud" or not budget.locked:
            return
        if not budget_file.exists() or json.loads(budget_file.read_text())["total"] != budget.total:
            stage.mkdir(parents=True, exist_ok=True)
            budget_file.write_text(json.dumps({"total": budget.total}))

    publish()
    loop = _loop(out_dir, f"unet_{role}", f"unet {role}", budget, state, ck, cfg, progress, position)
    unet.train()
    running = None
    while loop.running:
        step = loop.step
        # The batch depends only on (seed, step): both U-Nets see the same data, resumes repeat it.
        srng = np.random.default_rng([cfg.seed, 14, step])
        g = torch.Generator().manual_seed(int(srng.integers(2**62)))
        # Random numbers come from the CPU generator (same on every device), then move.
        idx = torch.from_numpy(srng.choice(n, size=min(cfg.unet_batch, n), replace=False)).to(device)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g).to(device)) * scaling
        cond = text[idx].float()
        drop = (torch.rand(len(idx), generator=g) < cfg.cfg_dropout).to(device)
        cond[drop] = empty[0]
        t_cpu = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        t = t_cpu.to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        zt = sched.add_noise(z0, noise, t)
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(step, budget.total, base_lr, warmup=min(cfg.unet_warmup, budget.total // 10 + 1))
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        w = (torch.clamp(snr[t_cpu], max=cfg.min_snr_gamma) / snr[t_cpu]).to(device) if cfg.min_snr_gamma \
            else torch.ones_like(per)
        loss = (per * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        loop.advance()
        step = loop.step
        ema.update(unet, step)
        ema.decay = min(cfg.ema_decay, 1 - 10 / budget.total)  # average over ~the last 10% of a short run
        publish()
        if match and step % 10 == 0:
            budget.total = max(step, _cloud_total(out_dir))  # the cloud may have lowered its count
            loop.bar.total = budget.total
        running = per.mean().item() if running is None else 0.98 * running + 0.02 * per.mean().item()
        if loop.log_due:  # after the edge's count may have followed the cloud's
            loop.write_log({"mse": f"{running:.4f}"}, loss=loss.item(), mse=per.mean().item(), mse_ema=running,
                           lr=opt.param_groups[0]["lr"])
        loop.checkpoint({"unet": unet}, opt, ema, mse_ema=running)
    loop.bar.close()
    step = loop.step
    budget.locked = True
    publish()  # a run shorter than the timing window never fixed its count: the edge must not wait
    ema.copy_to(unet)
    unet.save_pretrained(stage / "final", safe_serialization=True)
    final = {"step": step, "total": budget.total, "locked": True, "done": True, "final_loss": loss.item(),
             "final_mse_ema": running, "wall_s": loop.wall_s,
             "params": sum(p.numel() for p in unet.parameters()), "lr": base_lr, "batch": cfg.unet_batch}
    ck.save(final, {"unet": unet}, opt, ema)
    return final


# ---------------------------------------------------------------- stage 5: export


def build_pipeline(out_dir: Path, role: str, *, unet=None):
    """A StableDiffusionPipeline from a run's stage outputs (final U-Net unless `unet` is given)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(str(out_dir / f"unet_{role}" / "final"))
    return StableDiffusionPipeline(
        vae=load_vae(out_dir), text_encoder=load_text_encoder(out_dir), tokenizer=_load_tokenizer(),
        unet=unet.eval(), scheduler=new_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pair(out_dir: Path, assets_dir: Path, cfg: TrainConfig, summary: dict) -> dict:
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for role in ("edge", "cloud"):
        pipe = build_pipeline(out_dir, role)
        if cfg.unet_fp16:
            pipe.unet.to(torch.float16)
        folder = assets_dir / role
        if folder.exists():
            shutil.rmtree(folder)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        sizes[role] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    pair = {"name": "embedded", "trained": True, "shared_latent_space": True, "height": 64, "width": 64,
            "unet_weights_dtype": "float16" if cfg.unet_fp16 else "float32",
            # the steps `load_pair` hands callers that name none (models.DEFAULT_STEPS elsewhere):
            # the world's 64x64 pictures render as well at 10 as at 20 (docs/benchmark.md)
            "default_steps": 10,
            # the policy of a session that names none (models.DEFAULT_POLICY elsewhere); the shipped
            # predictors were tuned on the shipped pair: re-tune them for a rebuilt one (docs/predictors.md)
            "default_policy": "learned",
            "training": {**summary, "config": asdict(cfg), "asset_bytes": sizes}}
    (assets_dir / "pair.json").write_text(json.dumps(pair, indent=2))
    return pair


# ---------------------------------------------------------------- orchestration


def _child(fn_name: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    _use_tf32()
    globals()[fn_name](**kwargs)


def _use_tf32() -> None:
    # Small models on a GPU: TF32 matmuls/convs are plenty precise and several times faster.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _run_parallel(jobs: list[tuple[str, dict]], parallel: bool) -> None:
    if not parallel:
        for fn_name, kwargs in jobs:
            globals()[fn_name](**kwargs)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(fn, kw), name=fn) for fn, kw in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"training processes failed: {failed} (see the log above; rerun to resume)")


def train_embedded(
    out_dir: str | Path,
    *,
    steps_scale: float = 1.0,
    resume: bool = True,
    progress: bool = True,
    export_to: str | Path | None = None,
    budget_minutes: float | None = None,
    parallel: bool = True,
    config: TrainConfig | None = None,
    device: str = "cpu",
) -> dict:
    """Rebuild the embedded edge/cloud pair from scratch (fixed seed) and export it.

    Args:
        out_dir: working folder for checkpoints (``<stage>/ckpt``), stage outputs and loss logs
            (``logs/<stage>.jsonl``). Rerunning with the same folder resumes where it stopped.
        steps_scale: multiplies every stage's step count (``0.01`` for a quick smoke run).
        resume: continue from checkpoints in ``out_dir``; False starts every stage afresh.
        progress: show tqdm progress bars.
        export_to: folder that receives ``edge/``, ``cloud/`` (StableDiffusionPipeline folders)
            and ``pair.json``; default: the package's ``assets/embedded``.
        budget_minutes: optional wall-clock budget; each stage then stops its cosine schedule early
            enough to finish in time (the step counts are the upper bounds).
        parallel: run independent stages (text encoder and VAE; the two U-Nets) as two
            one-thread processes (on a GPU: two processes sharing it).
        config: sizes and hyper-parameters (default `TrainConfig()` on the CPU, `GPU_CONFIG` on CUDA).
        device: ``cpu`` or a CUDA device; the exported weights are the same format either way.

    Returns the summary written to ``pair.json["training"]``.
    """
    if config is SMOKE_CONFIG and export_to is None:
        raise InvalidInputError("a smoke run needs --export-to DIR: it must not replace the shipped pair")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: no CUDA GPU is visible to PyTorch here; use --device cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = (config or (GPU_CONFIG if device.startswith("cuda") else TrainConfig())).scaled(steps_scale)
    _use_tf32()
    t0 = time.time()
    start = json.loads((out / "run.json").read_text()) if resume and (out / "run.json").exists() else None
    if start is None:
        start = {"t0": t0, "budget_minutes": budget_minutes, "config": asdict(cfg)}
        (out / "run.json").write_text(json.dumps(start, indent=1))
    base = start["t0"]
    budget = start["budget_minutes"] if budget_minutes is None else budget_minutes

    def deadline(frac: float) -> float | None:
        return None if budget is None else base + 60 * budget * frac

    common = {"out_dir": out, "cfg": cfg, "resume": resume, "progress": progress, "device": device}
    t = time.time()
    _run_parallel([
        ("train_text_encoder", {**common, "deadline": deadline(0.14), "position": 0}),
        ("train_vae", {**common, "deadline": deadline(0.27), "position": 1}),
    ], parallel)
    stage_a = time.time() - t
    t = time.time()
    cache = build_cache(out, cfg, resume=resume, progress=progress, device=device)
    stage_cache = time.time() - t
    t = time.time()
    _run_parallel([
        ("train_unet", {**common, "role": "edge", "deadline": deadline(0.96), "position": 0}),
        ("train_unet", {**common, "role": "cloud", "deadline": deadline(0.96), "position": 1}),
    ], parallel)
    stage_unet = time.time() - t
    states = {s: Checkpoint(out / s / "ckpt").state()
              for s in ("text_encoder", "vae", "vae_decoder", "unet_edge", "unet_cloud")}
    for s in states.values():
        s.pop("optimizer", None)
    summary = {
        "seed": cfg.seed,
        "stages": states,
        "cache": cache,
        "wall_s": {"text_encoder_and_vae": stage_a, "cache": stage_cache, "unets": stage_unet,
                   "total_this_call": time.time() - t0},
        "vae_test_psnr_db": max(states["vae"].get("test_psnr_db", -1.0),
                                states["vae_decoder"].get("test_psnr_db", -1.0)),
        "text_test_retrieval_top1_of_32": states["text_encoder"].get("test_retrieval_top1_of_32"),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "budget_minutes": budget,
        "torch_threads_per_process": 1 if parallel else torch.get_num_threads(),
    }
    export_pair(out, Path(export_to) if export_to else default_assets_dir(), cfg, summary)
    return summary

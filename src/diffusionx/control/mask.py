"""Where an edit lands: DiffEdit's mask, for local edits that keep the rest of the picture.

DiffEdit (Couairon et al., ICLR 2023; diffusers' `StableDiffusionDiffEditPipeline.generate_mask`)
noises the image at a middle timestep several times and asks the U-Net for the noise under the
old prompt and under the new one. Where the two prompts agree about the picture the predictions
agree; where the edit changes something they differ. DiffEdit thresholds the mean difference at
1.5 times its mean; that marks a third of the picture even for an edit that changes nothing, and
the edited region itself pulls the mean up. Here the difference is averaged over a few noise levels
and thresholded at `ratio` times its median (the typical untouched pixel). On the embedded pair's
test edits that spares 92-99% of the region an object edit must not touch (DiffEdit's rule: 59%);
bench-edits reports it per edit as `local_mask`.

A local round (`plan_local_edit`, then `Engine.start(..., edit_mask=...)`) regenerates inside the
mask and keeps the input latents outside it, so the pixels the user did not edit stay as they
were; a new backdrop is painted around the objects, whose pixels are then pasted back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine import Engine, Generation, steps_for_strength

NOISE_LEVELS = (0.7, 0.8, 0.9)  # the strengths the noise differences are averaged over
MASK_UNET_CALLS = len(NOISE_LEVELS)  # what one mask costs: a U-Net call per noise level
# A local round regenerates its region from noise: the rest of the picture is kept anyway, and
# on the embedded pair's test edits a lower strength made the edit less often (docs/control.md).
LOCAL_STRENGTH = 1.0
# Share of a local round's steps run on the whole picture before the blend; 0.25 and 0.4 made the
# edit no more often on pair5's test edits (0.55 / 0.54 vs 0.57).
LOCAL_FREE_STEPS = 0.0
# A background edit keeps only the objects' cores: the pixels over this many times the median
# noise difference (edit_mask's own 6x keeps their backdrop-colored borders too).
BACKDROP_RATIO = 10.0
# RGB distance from the old backdrop's color at which a pixel is an object's: 30 kept the objects'
# backdrop-tinted edges, which misled the evaluator's reading of them on the new backdrop
PASTE_TOLERANCE = 60.0
PLAIN_BACKDROP_STD = 20.0  # per-channel std (0-255) past which a backdrop is not plain: no paste


@torch.no_grad()
def edit_mask(
    engine: Engine,
    latents: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    *,
    seed: int = 0,
    strengths: tuple[float, ...] = NOISE_LEVELS,
    repeats: int = 16,
    ratio: float = 6.0,
    extend_ratio: float = 4.0,
    extend: int = 2,
    grow: int = 1,
    steps: int = 20,
) -> torch.Tensor:
    """The (1, 1, h, w) float mask of `latents` (one image) that the edit from `source_prompt` to
    `target_prompt` changes: 1 to regenerate, 0 to keep (`noise_difference`, then
    `threshold_difference`). Prompts that predict the same noise everywhere give an empty mask."""
    if ratio <= 0 or grow < 0:
        raise ValueError("ratio must be > 0 and grow >= 0")
    guide = noise_difference(engine, latents, source_prompt, target_prompt, seed=seed, strengths=strengths,
                             repeats=repeats, steps=steps)
    return threshold_difference(guide, ratio=ratio, extend_ratio=extend_ratio, extend=extend,
                                grow=grow).to(engine.dtype)


@torch.no_grad()
def noise_difference(engine: Engine, latents: torch.Tensor, source_prompt: str, target_prompt: str, *,
                     seed: int = 0, strengths: tuple[float, ...] = NOISE_LEVELS, repeats: int = 16,
                     steps: int = 20) -> torch.Tensor:
    """(1, 1, h, w): the mean absolute difference of the noise the U-Net predicts under the two
    prompts, over `repeats` noisings at each of the noise levels `strengths`.

    The unconditional rows of classifier-free guidance cancel in the difference (both prompts
    share the negative prompt) and guidance only scales it, which the thresholds' normalisation
    removes, so this runs the conditional rows only: 2 * `repeats` rows per noise level."""
    if latents.dim() != 4 or latents.shape[0] != 1:
        raise ValueError(f"a mask takes one image's latents (1, C, h, w), got {tuple(latents.shape)}")
    if repeats < 1 or not strengths:
        raise ValueError("repeats must be >= 1 and strengths not empty")
    sched = engine.new_scheduler("ddim")
    sched.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    source = engine.encode_prompt(source_prompt, guidance=False).cond
    target = engine.encode_prompt(target_prompt, guidance=False).cond
    context = torch.cat([source.expand(repeats, -1, -1), target.expand(repeats, -1, -1)])
    image = latents.to(engine.device, engine.dtype).expand(repeats, -1, -1, -1)
    guide = torch.zeros((1, 1, *latents.shape[-2:]), device=engine.device)
    for strength in strengths:
        t = sched.timesteps[steps - max(1, steps_for_strength(strength, steps))]
        noise = torch.randn(image.shape, generator=generator, dtype=engine.dtype).to(engine.device)
        sample = sched.scale_model_input(sched.add_noise(image, noise, t.reshape(1)), t)
        pred = engine.unet(torch.cat([sample, sample]), t.reshape(1).expand(2 * repeats).to(engine.device),
                           encoder_hidden_states=context, return_dict=False)[0]
        eps_source, eps_target = pred.float().chunk(2)
        guide += (eps_target - eps_source).abs().mean(dim=(0, 1), keepdim=True)
    return guide


def threshold_difference(guide: torch.Tensor, *, ratio: float = 6.0, extend_ratio: float = 4.0, extend: int = 2,
                         grow: int = 1) -> torch.Tensor:
    """The float mask of a `noise_difference`: pixels over `ratio` times the median difference
    seed it; it then extends (like Canny's hysteresis) over the connected pixels over
    `extend_ratio` times the median, at most `extend` latent pixels out, so a whole edited object
    is taken without the scattered weak differences elsewhere; `grow` dilates the result by that
    many latent pixels (an edited object's edge belongs to the edit)."""
    typical = guide.median()
    if not torch.isfinite(typical) or guide.max() <= 0:
        return torch.zeros_like(guide)
    mask = (guide > ratio * typical).float()
    candidates = (guide > extend_ratio * typical).float()
    for _ in range(extend):  # geodesic dilation of the seeds inside the candidates
        grown = torch.maximum(F.max_pool2d(mask, 3, stride=1, padding=1) * candidates, mask)
        if torch.equal(grown, mask):
            break
        mask = grown
    if grow:
        mask = F.max_pool2d(mask, 2 * grow + 1, stride=1, padding=grow)
    return mask


@dataclass(frozen=True)
class LocalEdit:
    """What a local round regenerates (`region`, latent pixels, 1 = regenerate) and, for a
    background edit, the objects' latent region whose pixels are pasted back after decoding."""

    region: torch.Tensor
    objects: torch.Tensor | None = None


def _background_edit(previous_prompt: str, prompt: str):
    """The previous scene when the edit names a new backdrop and leaves every object alone."""
    from ..world.captions import parse_prompt
    from .rounds import changed_objects, parse_weights

    try:
        before, after = parse_prompt(parse_weights(previous_prompt)[0]), parse_prompt(parse_weights(prompt)[0])
    except Exception:
        return None
    if before is None or after is None or not before.objects or after.background in (None, before.background):
        return None
    gone, came = changed_objects(before, after)
    return None if gone or came else before


def plan_local_edit(engine: Engine, latents: torch.Tensor, previous_prompt: str, prompt: str, *,
                    seed: int = 0) -> LocalEdit:
    """The local round for an edit from `previous_prompt` to `prompt` (`latents`: the previous
    round's). Every edit but a new backdrop: regenerate `edit_mask`'s region.

    A new backdrop (changed, or named where the previous prompt left it open) changes the noise
    predictions on the objects (their contrast with it), not on the backdrop; the region is
    everything but the objects, found as the difference between the previous prompt and its
    backdrop alone. Kept latents carry their backdrop's color, and at 16x16 latents an object's
    border pixels are half backdrop: with the objects mask grown to cover them, the regenerated
    backdrop took the old color in 62% of pair5's test edits. So the round keeps only the objects'
    cores (`BACKDROP_RATIO`, grow 1), and `paste_objects` then puts the previous image's objects
    on the new backdrop inside the wider mask."""
    before = _background_edit(previous_prompt, prompt)
    if before is None:
        return LocalEdit(edit_mask(engine, latents, previous_prompt, prompt, seed=seed))
    backdrop = f"a {before.background} background" if before.background else "a background"
    guide = noise_difference(engine, latents, backdrop, previous_prompt, seed=seed)
    cores = threshold_difference(guide, ratio=BACKDROP_RATIO, grow=1)
    objects = threshold_difference(guide, grow=2)
    return LocalEdit((1.0 - cores).to(engine.dtype), objects.to(engine.dtype))


def paste_objects(previous: Image.Image, image: Image.Image, objects: torch.Tensor, *,
                  tolerance: float = PASTE_TOLERANCE) -> Image.Image:
    """`image` with the previous image's objects cut out and put on its new backdrop. Inside
    `objects` (a latent mask, upsampled), the pixels farther than `tolerance` (RGB distance) from
    the previous backdrop's color (its median outside the mask) are the objects' and come back as
    they were; the rest of the mask takes the new backdrop's color (its median outside the mask),
    which also clears what the regenerated picture drew of the objects around their kept cores.
    Both backdrops must be plain for that to tell objects from backdrop: when either image's
    pixels outside the mask vary more than `PLAIN_BACKDROP_STD`, or the mask covers everything or
    nothing, `image` comes back unchanged. (Inpainting pipelines paste kept pixels back the same
    way after decoding, e.g. diffusers' `VaeImageProcessor.apply_overlay`.)"""
    before = np.asarray(previous.convert("RGB"), dtype=np.float32)
    after = np.asarray(image.convert("RGB"))
    inside = F.interpolate(objects.float().cpu(), size=before.shape[:2], mode="nearest")[0, 0].numpy() > 0.5
    if not inside.any() or inside.all():
        return image
    old_backdrop, new_backdrop = before[~inside], after[~inside].astype(np.float32)
    if max(old_backdrop.std(axis=0).mean(), new_backdrop.std(axis=0).mean()) > PLAIN_BACKDROP_STD:
        return image
    object_pixels = inside & (np.linalg.norm(before - np.median(old_backdrop, axis=0), axis=-1) > tolerance)
    out = after.copy()
    out[inside & ~object_pixels] = np.median(new_backdrop, axis=0).round().astype(np.uint8)
    out[object_pixels] = np.asarray(previous.convert("RGB"))[object_pixels]
    return Image.fromarray(out)


def finish_local(engine: Engine, plan: LocalEdit, previous_image: Image.Image, generation: Generation) -> Generation:
    """A local round's generation with `plan`'s objects pasted back (background edits); its latents
    are the pasted image's, so the next round and the cloud start from what the user sees."""
    if plan.objects is None:
        return generation
    image = paste_objects(previous_image, generation.image, plan.objects)
    if image is generation.image:
        return generation
    start = time.perf_counter()
    latents = engine.encode_image(image)
    generation.timing.vae_encode_s += time.perf_counter() - start
    return replace(generation, image=image, latents=latents)

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

A local round (`Engine.start(..., edit_mask=...)`) then regenerates inside the mask and keeps the
input latents outside it, so the pixels the user did not edit stay as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine import Engine, make_scheduler, steps_for_strength

NOISE_LEVELS = (0.7, 0.8, 0.9)  # the strengths the noise differences are averaged over
MASK_UNET_CALLS = len(NOISE_LEVELS)  # what one mask costs: a U-Net call per noise level
# A local round regenerates its region from noise: the rest of the picture is kept anyway, and
# on the embedded pair's test edits a lower strength made the edit less often (docs/control.md).
LOCAL_STRENGTH = 1.0
# Share of a local round's steps run on the whole picture before the blend; 0.25 and 0.4 made the
# edit no more often on pair5's test edits (0.55 / 0.54 vs 0.57).
LOCAL_FREE_STEPS = 0.0


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
    `target_prompt` changes: 1 to regenerate, 0 to keep. Pixels over `ratio` times the median
    difference seed the mask; it then extends (like Canny's hysteresis) over the connected pixels
    over `extend_ratio` times the median, at most `extend` latent pixels out, so a whole edited
    object is taken without the scattered weak differences elsewhere; `grow` dilates the result by
    that many latent pixels (an edited object's edge belongs to the edit). Prompts that predict
    the same noise everywhere give an empty mask.

    The unconditional rows of classifier-free guidance cancel in the difference (both prompts
    share the negative prompt) and guidance only scales it, which the normalisation removes, so
    this runs the conditional rows only: 2 * `repeats` rows per noise level (`strengths`).
    """
    if latents.dim() != 4 or latents.shape[0] != 1:
        raise ValueError(f"edit_mask takes one image's latents (1, C, h, w), got {tuple(latents.shape)}")
    if repeats < 1 or ratio <= 0 or grow < 0 or not strengths:
        raise ValueError("repeats must be >= 1, ratio > 0, grow >= 0 and strengths not empty")
    sched = make_scheduler("ddim", engine.scheduler_config)
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
        guide += (eps_target - eps_source).abs().mean(dim=(0, 1), keepdim=True)  # (1, 1, h, w)
    typical = guide.median()
    if not torch.isfinite(typical) or guide.max() <= 0:
        return torch.zeros_like(guide, dtype=engine.dtype)
    mask = (guide > ratio * typical).float()
    candidates = (guide > extend_ratio * typical).float()
    for _ in range(extend):  # geodesic dilation of the seeds inside the candidates
        grown = F.max_pool2d(mask, 3, stride=1, padding=1) * candidates
        grown = torch.maximum(grown, mask)
        if torch.equal(grown, mask):
            break
        mask = grown
    if grow:
        mask = F.max_pool2d(mask, 2 * grow + 1, stride=1, padding=grow)
    return mask.to(engine.dtype)


def local_edit_mask(engine: Engine, latents: torch.Tensor, previous_prompt: str, prompt: str, *,
                    seed: int = 0) -> torch.Tensor:
    """The region a local round regenerates. For a background change in the embedded world the
    noise differences sit on the objects (their contrast with the backdrop changes), not on the
    backdrop; there the region is everything but the objects, found as the difference between
    the prompt and its background alone. Every other edit: `edit_mask`."""
    from .rounds import edit_kind

    if edit_kind(previous_prompt, prompt) == "change_background":
        from ..world.captions import parse_prompt

        before = parse_prompt(previous_prompt)
        if before is not None and before.background is not None and before.objects:
            backdrop = f"a {before.background} background"
            objects = edit_mask(engine, latents, backdrop, previous_prompt, seed=seed, grow=2)
            return 1.0 - objects
    return edit_mask(engine, latents, previous_prompt, prompt, seed=seed)

"""Local edits: the engine keeps the input outside the mask exactly (the blend of diffusers'
inpainting pipeline with a plain U-Net), DiffEdit's mask finds where an edit lands, and the
session's "local" round uses both."""

import pytest
import torch

from diffusionx import InvalidInputError
from diffusionx.control.mask import LOCAL_STRENGTH, MASK_UNET_CALLS, edit_mask, local_edit_mask
from diffusionx.policies import FixedStrength
from diffusionx.session import EdgeSession

STEPS = 4
PREV = "a red circle on the left"


@pytest.fixture(scope="module")
def edge(untrained_pair):
    return untrained_pair.edge


@pytest.fixture(scope="module")
def previous(edge):
    return edge.generate(PREV, seed=3, steps=STEPS, decode=False).latents


def _run(edge, previous, mask, strength=0.75, seed=5, prompt="a blue circle on the left"):
    return edge.generate(prompt, seed=seed, steps=STEPS, strength=strength, init_latents=previous,
                         edit_mask=mask, decode=False).latents


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_kept_region_is_the_input_exactly_and_a_full_mask_is_plain_sdedit(edge, previous, strength):
    h, w = previous.shape[-2:]
    plain = edge.generate("a blue circle on the left", seed=5, steps=STEPS, strength=strength,
                          init_latents=previous if strength < 1 else None, decode=False).latents
    assert torch.equal(_run(edge, previous, torch.ones(1, 1, h, w), strength), plain)
    assert torch.equal(_run(edge, previous, torch.zeros(1, 1, h, w), strength), previous)
    half = torch.zeros(1, 1, h, w)
    half[..., : w // 2] = 1.0
    out = _run(edge, previous, half, strength)
    assert torch.equal(out[..., w // 2 :], previous[..., w // 2 :])  # kept: bit for bit
    assert not torch.allclose(out[..., : w // 2], previous[..., : w // 2])  # edited


def test_free_steps_let_the_whole_picture_move_first_and_still_keep_the_outside(edge, previous):
    h, w = previous.shape[-2:]
    half = torch.zeros(1, 1, h, w)
    half[..., : w // 2] = 1.0
    held = _run(edge, previous, half, 1.0)
    free = edge.generate("a blue circle on the left", seed=5, steps=STEPS, strength=1.0, init_latents=previous,
                         edit_mask=half, free_steps=2, decode=False).latents
    assert torch.equal(free[..., w // 2 :], previous[..., w // 2 :])  # the last step blends all the same
    assert not torch.equal(free[..., : w // 2], held[..., : w // 2])  # the region formed with the whole picture


def test_a_bad_mask_is_refused_with_what_to_pass(edge, previous):
    h, w = previous.shape[-2:]
    with pytest.raises(InvalidInputError, match="latent size"):
        _run(edge, previous, torch.ones(1, 1, h * 2, w * 2))
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        _run(edge, previous, torch.full((1, 1, h, w), 2.0))
    with pytest.raises(InvalidInputError, match="input latents"):
        edge.generate("a circle", seed=1, steps=STEPS, edit_mask=torch.ones(1, 1, h, w), decode=False)


def test_edit_mask_is_empty_for_the_same_prompt_and_seeded(edge, previous):
    assert edit_mask(edge, previous, PREV, PREV).sum() == 0  # nothing changes: keep everything
    a = edit_mask(edge, previous, PREV, "a red circle on the right", seed=1)
    assert torch.equal(a, edit_mask(edge, previous, PREV, "a red circle on the right", seed=1))
    assert a.shape == (1, 1, *previous.shape[-2:]) and set(a.unique().tolist()) <= {0.0, 1.0}


def test_edit_mask_finds_the_edited_object_on_the_shipped_pair(embedded_pair):
    edge = embedded_pair.edge
    before = "a red circle on the left and a blue square on the right on a white background"
    after = "a green circle on the left and a blue square on the right on a white background"
    z = edge.generate(before, seed=0, decode=False).latents
    mask = edit_mask(edge, z, before, after)
    w = mask.shape[-1]
    left, right = mask[..., : w // 2].mean().item(), mask[..., w // 2 :].mean().item()
    assert left > 0.05 and left > 3 * right  # the edited circle's half, not the untouched square's
    backdrop = local_edit_mask(edge, z, before, before.replace("white background", "black background"))
    h = backdrop.shape[-2]
    # a background edit regenerates around the objects (both sit on the middle rows), not over them
    assert backdrop[..., :2, :].mean() > 0.8 and backdrop[..., -2:, :].mean() > 0.8
    assert backdrop[..., h // 2 - 2 : h // 2 + 2, :].mean() < 0.2


def test_local_round_in_a_session(untrained_pair, count_unet_calls):
    session = EdgeSession(untrained_pair, policy=FixedStrength(edge=0.5), steps=STEPS, seed=3)
    first = session.generate(PREV)
    calls = count_unet_calls(untrained_pair.edge.unet)
    local = session.generate("a blue circle on the left", mode="local")
    assert (local.mode, local.parent, local.strength) == ("local", 1, LOCAL_STRENGTH)
    assert len(calls.batches) == STEPS + MASK_UNET_CALLS and local.timing.unet_calls == STEPS + MASK_UNET_CALLS
    mask = local_edit_mask(untrained_pair.edge, first.latents, PREV, "a blue circle on the left", seed=3)
    kept = mask == 0
    assert kept.any() and torch.equal(local.latents[kept.expand_as(local.latents)],
                                      first.latents[kept.expand_as(first.latents)])
    softer = session.generate("a green circle on the left", mode="local", strength=0.5)
    assert softer.strength == 0.5 and softer.unet_steps == STEPS // 2
    with pytest.raises(InvalidInputError, match="re-walked"):
        session.generate("a green circle on the left", mode="controlled")  # a masked round has no trajectory
    assert len(session.rounds) == 3  # the refused round lost nothing


def test_a_given_blend_mask_keeps_the_source_outside_it(edge, previous):
    from diffusionx.control import RoundSpec, controlled_generate

    h, w = previous.shape[-2:]
    half = torch.zeros(1, 1, h, w)
    half[..., : w // 2] = 1.0
    out = controlled_generate(edge, "a blue circle on the left", RoundSpec(PREV, seed=3), steps=STEPS,
                              blend_mask=half, decode=False)
    assert torch.equal(out.mask, half)
    assert torch.equal(out.latents[..., w // 2 :], previous[..., w // 2 :])  # the re-walked source, exactly
    assert not torch.allclose(out.latents[..., : w // 2], previous[..., : w // 2])

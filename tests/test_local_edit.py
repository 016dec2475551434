"""Local edits: the engine keeps the input outside the mask exactly (the blend of diffusers'
inpainting pipeline with a plain U-Net), DiffEdit's mask finds where an edit lands, and the
session's "local" round uses both."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionx import InvalidInputError
from diffusionx.control.mask import (
    LOCAL_STRENGTH,
    MASK_UNET_CALLS,
    edit_mask,
    paste_objects,
    plan_local_edit,
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
    plan = plan_local_edit(edge, z, before, before.replace("white background", "black background"))
    backdrop, objects = plan.region, plan.objects
    h = backdrop.shape[-2]
    # a background edit regenerates around the objects (both sit on the middle rows), not over them
    assert backdrop[..., :2, :].mean() > 0.8 and backdrop[..., -2:, :].mean() > 0.8
    assert 0 < (1 - backdrop).sum() < objects.sum()  # it keeps the objects' cores; their pixels come back
    assert objects[..., h // 2 - 2 : h // 2 + 2, :].mean() > 0.5 and objects[..., :2, :].mean() < 0.2
    assert plan_local_edit(edge, z, before, after).objects is None  # an object edit pastes nothing


def test_a_backdrop_named_where_there_was_none_is_a_background_edit(embedded_pair):
    edge = embedded_pair.edge
    before = "a huge pink ring on the left side and a tiny black ring at the upper left"
    z = edge.generate(before, seed=0, decode=False).latents
    plan = plan_local_edit(edge, z, before, "on a purple background, " + before)
    assert plan.objects is not None and plan.region.mean() > 0.5  # not an empty mask: the backdrop is the edit
    moved = plan_local_edit(edge, z, before, "on a purple background, a huge pink ring on the right side")
    assert moved.objects is None  # an object changed too: the plain mask of what changed


def test_paste_objects_puts_back_the_old_object_pixels_on_a_plain_backdrop():
    old = np.full((64, 64, 3), (250, 250, 250), np.uint8)
    old[20:30, 8:18] = (200, 10, 10)  # a red object on white
    new = np.full((64, 64, 3), (10, 10, 10), np.uint8)  # the new black backdrop, the object redrawn badly
    new[22:32, 10:20] = (120, 60, 60)
    objects = torch.zeros(1, 1, 16, 16)
    objects[..., 4:9, 1:6] = 1.0  # latent pixels over the object and a ring of backdrop
    out = np.asarray(paste_objects(Image.fromarray(old), Image.fromarray(new), objects))
    assert (out[20:30, 8:18] == (200, 10, 10)).all()  # the object's own pixels, exactly
    assert (out[16:20, 4:24] == (10, 10, 10)).all()  # the ring of old backdrop takes the new one
    assert (out[30:32, 10:20] == (10, 10, 10)).all()  # and the badly redrawn object around it is gone
    assert (out[40:, :] == new[40:, :]).all()
    busy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    unchanged = paste_objects(Image.fromarray(busy), Image.fromarray(new), objects)
    assert (np.asarray(unchanged) == new).all()  # no plain backdrop to tell objects from: nothing pasted
    assert (np.asarray(paste_objects(Image.fromarray(old), Image.fromarray(new), torch.zeros(1, 1, 16, 16)))
            == new).all()


def test_a_local_background_round_keeps_the_object_pixels_and_hands_on_what_it_shows(embedded_pair):
    session = EdgeSession(embedded_pair, policy=FixedStrength(edge=0.6), seed=0)
    before = "a large red circle on the left on a white background"
    first = session.generate(before)
    local = session.generate(before.replace("white", "blue"), mode="local")
    old, new = np.asarray(first.image).astype(int), np.asarray(local.image).astype(int)
    backdrop = np.median(old.reshape(-1, 3), axis=0)
    pasted = (np.abs(new - old).sum(-1) == 0) & (np.linalg.norm(old - backdrop, axis=-1) > 30)
    assert pasted.mean() > 0.03  # the circle's own pixels, exactly as the user saw them
    assert np.abs(new[:, -8:].mean((0, 1)) - old[:, -8:].mean((0, 1))).max() > 60  # the backdrop did change
    assert torch.equal(local.latents, embedded_pair.edge.encode_image(local.image))  # the next round starts here


def test_local_round_in_a_session(untrained_pair, count_unet_calls):
    session = EdgeSession(untrained_pair, policy=FixedStrength(edge=0.5), steps=STEPS, seed=3)
    first = session.generate(PREV)
    calls = count_unet_calls(untrained_pair.edge.unet)
    local = session.generate("a blue circle on the left", mode="local")
    assert (local.mode, local.parent, local.strength) == ("local", 1, LOCAL_STRENGTH)
    assert len(calls.batches) == STEPS + MASK_UNET_CALLS and local.timing.unet_calls == STEPS + MASK_UNET_CALLS
    mask = plan_local_edit(untrained_pair.edge, first.latents, PREV, "a blue circle on the left", seed=3).region
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

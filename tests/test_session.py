"""Multi-round edge sessions: rounds, branching, failures that lose nothing, and finalize."""

import pytest
import torch

from diffusionx import InvalidInputError, RoundNotFoundError
from diffusionx.cloud import CloudRefiner
from diffusionx.policies import FixedStrength
from diffusionx.session import EdgeSession
from diffusionx.wire import latents_from_bytes, latents_to_bytes


@pytest.fixture
def session(untrained_pair):
    return EdgeSession(untrained_pair, policy=FixedStrength(edge=0.5, cloud=0.3), steps=6, seed=4)


def test_rounds_reuse_the_previous_latent(session):
    first = session.generate("a red circle on the left")
    second = session.generate("a red circle on the left on a blue background")
    assert (first.mode, first.strength, first.unet_steps, first.parent) == ("fresh", 1.0, 6, None)
    assert (second.mode, second.strength, second.unet_steps, second.parent) == ("sdedit", 0.5, 3, 1)
    # Round 2 is exactly SDEdit of round 1's latent with the edge engine.
    expected = session.pair.edge.generate(
        second.prompt, seed=4, steps=6, strength=0.5, init_latents=first.latents, decode=False
    )
    torch.testing.assert_close(second.latents, expected.latents, rtol=0, atol=0)
    assert second.timing.unet_s > 0 and second.timing.decode_s > 0
    assert second.image.size == (64, 64)


def test_explicit_strength_and_fresh_rounds(session):
    session.generate("a star")
    fresh = session.generate("a heart", strength=1.0)
    assert fresh.mode == "fresh" and fresh.parent is None and fresh.unet_steps == 6
    kept = session.generate("a heart", strength=0.0)
    assert kept.unet_steps == 0 and torch.equal(kept.latents, fresh.latents)


def test_back_branches_and_keeps_history(session):
    session.generate("a red circle")
    second = session.generate("a red circle and a blue star")
    session.back(1)
    third = session.generate("a green circle")
    assert third.parent == 1 and session.head == 3
    assert [r.index for r in session.rounds] == [1, 2, 3]
    assert session.round(2) is second  # the branch we left is still there
    assert [h["parent"] for h in session.history()] == [None, 1, 1]


def test_bad_input_loses_nothing(session):
    session.generate("a red circle")
    session.generate("a blue circle")
    before = [(r.prompt, r.latents.clone()) for r in session.rounds]
    bad_calls = [
        lambda: session.generate(""),
        lambda: session.generate("   "),
        lambda: session.generate("a star", strength=1.5),
        lambda: session.generate("a star", seed="x"),
        lambda: session.back(3),
        lambda: session.back(0),
        lambda: session.round(-1),
        lambda: session.finalize(strength=-0.5),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInputError):
            call()
    with pytest.raises(RoundNotFoundError, match="rounds 1-2"):
        session.back(7)
    assert session.head == 2
    assert [(r.prompt) for r in session.rounds] == [p for p, _ in before]
    for r, (_, latents) in zip(session.rounds, before):
        assert torch.equal(r.latents, latents)


def test_finalize_refines_the_head_latent_with_the_cloud(session):
    session.generate("a red circle")
    head = session.generate("a red circle on a white background")
    final = session.finalize()
    assert final.refined and final.reason is None
    assert (final.strength, final.unet_steps, final.source_round) == (0.3, 2, 2)
    # What crosses the wire: fp16 latents as safetensors (4x16x16x2 bytes + header) and the prompt.
    wire = latents_to_bytes(head.latents)
    assert final.bytes_up == len(wire) + len(head.prompt.encode())
    assert 4 * 16 * 16 * 2 <= final.bytes_down < 4 * 16 * 16 * 2 + 200
    expected = session.pair.cloud.generate(
        head.prompt, seed=4, steps=6, strength=0.3, init_latents=latents_from_bytes(wire), decode=False
    )
    torch.testing.assert_close(final.latents, expected.latents.half().float(), rtol=0, atol=0)
    assert final.cloud_seconds > 0


def test_finalize_keeps_the_preview_when_the_cloud_fails(untrained_pair):
    class Unreachable:
        def refine(self, request):
            raise ConnectionError("cloud.example is unreachable")

    session = EdgeSession(untrained_pair, cloud=Unreachable(), steps=3)
    preview = session.generate("a red circle")
    final = session.finalize()
    assert not final.refined
    assert "unreachable" in final.reason and "preview" in final.reason
    assert final.image is preview.image
    assert len(session.rounds) == 1


def test_finalize_before_any_round(session):
    with pytest.raises(InvalidInputError, match="generate a preview first"):
        session.finalize()


def test_image_hand_off_when_latent_spaces_differ(untrained_pair):
    """Without a shared latent space the preview goes up as a PNG and is re-encoded by the cloud."""
    from dataclasses import replace

    pair = replace(untrained_pair, shared_latent_space=False)
    session = EdgeSession(pair, steps=4)
    session.generate("a blue square")
    final = session.finalize(strength=0.5)
    assert final.refined and final.latents is None
    assert final.image.size == (64, 64)
    assert final.bytes_down > 0 and final.cloud_timing.vae_encode_s > 0


def test_cloud_refiner_rejects_bad_requests(untrained_pair):
    from diffusionx.cloud import RefineRequest

    refiner = CloudRefiner(untrained_pair.cloud)
    good = latents_to_bytes(torch.zeros(1, 4, 16, 16))
    for request, message in [
        (RefineRequest("a", 0.5, latents=None), "exactly one"),
        (RefineRequest("a", 0.5, latents=b"not safetensors"), "safetensors"),
        (RefineRequest("a", 0.5, latents=latents_to_bytes(torch.zeros(1, 4, 9, 9))), "shape"),  # 36x36 px
        (RefineRequest("a", 2.0, latents=good), "strength"),
        (RefineRequest("", 0.5, latents=good), "empty"),
        (RefineRequest("a", 0.5, image_png=b"\x89PNG broken"), "PNG"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            refiner.refine(request)


def test_latent_hand_off_matches_image_hand_off_within_vae_error(embedded_pair):
    """Handing the cloud the latent skips a VAE decode+encode; the result differs from the image
    hand-off by no more than that round trip's own error (trained VAE, so the bound means something)."""
    from dataclasses import replace

    import numpy as np

    prompt = "a large red circle on the left and a small yellow star at the top right on a blue background"
    finals, preview = [], None
    for shared in (True, False):
        session = EdgeSession(replace(embedded_pair, shared_latent_space=shared), steps=20, seed=3)
        preview = session.generate(prompt)
        final = session.finalize(strength=0.5)
        assert final.refined and final.image.size == preview.image.size
        finals.append(np.asarray(final.image, dtype=np.float32))
    cloud = embedded_pair.cloud
    round_trip = cloud.decode(cloud.encode_image(preview.image))[0]
    vae_error = np.abs(np.asarray(round_trip, dtype=np.float32) - np.asarray(preview.image, dtype=np.float32)).mean()
    hand_off_gap = np.abs(finals[0] - finals[1]).mean()
    assert hand_off_gap <= 2 * vae_error + 1.0, (hand_off_gap, vae_error)


def test_finalize_refines_or_regenerates(untrained_pair):
    from diffusionx import InvalidInputError
    from diffusionx.policies import FixedStrength
    from diffusionx.session import EdgeSession

    session = EdgeSession(untrained_pair, policy=FixedStrength(0.6, 0.3), steps=4)
    session.generate("a red circle on the left")
    assert session.finalize().strength == 0.3  # refine: the policy's strength, keeps the preview
    regenerated = session.finalize(mode="regenerate")
    assert regenerated.strength == 1.0 and regenerated.unet_steps == 4 and regenerated.refined
    with pytest.raises(InvalidInputError, match="finalize mode"):
        session.finalize(mode="redo")
    with pytest.raises(InvalidInputError, match="strength 1"):
        session.finalize(mode="regenerate", strength=0.5)

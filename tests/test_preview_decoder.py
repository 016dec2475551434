"""The edge's tiny preview decoder: previews through it, finals (and fallbacks) through the VAE,
its load errors, its place in the latency model, and the shipped one's fidelity to the VAE."""

import numpy as np
import pytest
import torch

from diffusionx.bench.harness import Method, SessionRecord, session_latency
from diffusionx.bench.profiles import get_profile
from diffusionx.errors import InvalidInputError, ModelNotAvailableError
from diffusionx.models import EMBEDDED_DIR, load_pair
from diffusionx.policies import FixedStrength
from diffusionx.session import EdgeSession, advance
from diffusionx.training.preview_decoder import SMOKE_PREVIEW_CONFIG, new_preview_decoder


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preview_decoder")
    torch.manual_seed(0)
    new_preview_decoder(SMOKE_PREVIEW_CONFIG).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pair_with_decoder(decoder_folder):
    """The untrained pair with a (random) preview decoder: what goes through which decoder, fast."""
    return load_pair("untrained", preview_decoder=str(decoder_folder))


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_previews_use_the_preview_decoder_and_finals_the_vae(pair_with_decoder):
    edge = pair_with_decoder.edge
    session = EdgeSession(pair_with_decoder, policy=FixedStrength(edge=0.5, cloud=0.5), steps=4, seed=3)
    first = session.generate("a red circle")
    second = session.generate("a red circle on a blue background")
    for round_ in (first, second):
        assert round_.preview_decoded and round_.summary()["decoder"] == "preview"
        assert np.array_equal(pixels(round_.image), pixels(edge.decode(round_.latents, preview=True)[0]))
        assert not np.array_equal(pixels(round_.image), pixels(edge.decode(round_.latents)[0]))
    final = session.finalize()
    assert final.refined
    assert np.array_equal(pixels(final.image), pixels(edge.decode(final.latents)[0]))


def test_sessions_can_keep_the_vae_for_previews(pair_with_decoder):
    edge = pair_with_decoder.edge
    plain = EdgeSession(pair_with_decoder, steps=3, seed=1, preview_decoder=False)
    fast = EdgeSession(pair_with_decoder, steps=3, seed=1)
    rounds = advance([plain, fast], ["a star", "a star"])
    assert [r.preview_decoded for r in rounds] == [False, True]
    assert torch.equal(rounds[0].latents, rounds[1].latents)  # the decoder changes the image, never the latent
    assert np.array_equal(pixels(rounds[0].image), pixels(edge.decode(rounds[0].latents)[0]))
    assert np.array_equal(pixels(rounds[1].image), pixels(edge.decode(rounds[1].latents, preview=True)[0]))


def test_an_unreachable_cloud_falls_back_to_the_vae_decode_of_the_preview(pair_with_decoder):
    class DownCloud:
        def refine(self, request):
            raise ConnectionError("no route to the cloud")

    session = EdgeSession(pair_with_decoder, cloud=DownCloud(), steps=3, seed=2)
    preview = session.generate("a green heart")
    final = session.finalize()
    assert not final.refined and "ConnectionError" in final.reason
    assert np.array_equal(pixels(final.image), pixels(pair_with_decoder.edge.decode(preview.latents)[0]))


def test_no_preview_decoder_unless_asked_or_shipped(untrained_pair, decoder_folder):
    assert untrained_pair.edge.preview_vae is None  # only the embedded preset ships one
    assert load_pair("untrained", preview_decoder=None).edge.preview_vae is None
    assert EdgeSession(untrained_pair, steps=2).generate("a ring").preview_decoded is False


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_preview_decoder_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"preview decoder .*no such folder.*\(--preview-decoder none\)"):
        load_pair("untrained", preview_decoder=str(tmp_path / "missing"))
    with pytest.raises(ModelNotAvailableError, match="no such folder; as a hub id"):
        load_pair("untrained", preview_decoder="runs_missing/decoder")  # relative folder or hub id
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), num_encoder_blocks=(1,),
                    num_decoder_blocks=(1,), latent_channels=3).save_pretrained(str(tmp_path / "three"))
    with pytest.raises(InvalidInputError, match=r"3-channel latents.*4-channel"):
        load_pair("untrained", preview_decoder=str(tmp_path / "three"))


def test_latency_model_charges_the_preview_decode_to_preview_rounds():
    calib = {
        "edge": {"unet_step_s": 0.1, "text_encode_s": 0.01, "decode_s": 0.05, "preview_decode_s": 0.01},
        "cloud": {"unet_step_s": 0.05, "text_encode_s": 0.01, "decode_s": 0.02},
    }
    profile = get_profile("measured")
    record = SessionRecord(rounds=[{"unet_steps": 2, "preview_decoded": True},
                                   {"unet_steps": 2, "preview_decoded": False}])
    waits = session_latency(Method("edge-only", "edge-only"), record, calib, profile)["round_waits_s"]
    assert waits == pytest.approx([0.01 + 0.2 + 0.01, 0.01 + 0.2 + 0.05])
    del calib["edge"]["preview_decode_s"]
    with pytest.raises(InvalidInputError, match="--calibrate-only"):
        session_latency(Method("edge-only", "edge-only"), record, calib, profile)


@pytest.mark.skipif(not (EMBEDDED_DIR / "preview_decoder").exists(), reason="no shipped preview decoder")
def test_shipped_preview_decoder_renders_what_the_vae_renders(embedded_pair):
    """On the edge's own generations the tiny decode stays close to the VAE's, and it is the
    default for the embedded pair's previews."""
    from diffusionx.metrics.image import psnr

    edge = embedded_pair.edge
    assert edge.preview_vae is not None
    prompts = ["a large red circle on the left on a blue background", "a green star", "heart, black background",
               "a small yellow square at the top right and a purple ring"]
    jobs = [edge.prepare(p, seed=i, steps=10) for i, p in enumerate(prompts)]
    edge.run(jobs)
    latents = torch.cat([job.latents for job in jobs])
    full, tiny = edge.decode(latents), edge.decode(latents, preview=True)
    values = [psnr(a, b) for a, b in zip(full, tiny)]
    # A random decoder lands near 10 dB; the shipped one 29.5 dB on average here. An unnamed
    # background behind two objects is its hardest case (20.4 dB for the last prompt).
    assert np.mean(values) > 25.0 and min(values) > 17.0, values


def test_calibration_times_the_preview_decoder_where_the_edge_has_one(pair_with_decoder, untrained_pair):
    from diffusionx.bench.harness import calibrate

    with_decoder = calibrate(pair_with_decoder, repeats=2)
    assert with_decoder["edge"]["preview_decode_s"] > 0
    assert "preview_decode_s" not in with_decoder["cloud"]
    assert "preview_decode_s" not in calibrate(untrained_pair, repeats=2)["edge"]


@pytest.mark.slow
def test_train_preview_decoder_smoke_exports_a_decoder_the_pair_loads(tmp_path, capsys):
    import json

    from diffusionx.cli import main

    if not (EMBEDDED_DIR / "pair.json").exists():
        pytest.skip("the trained embedded pair is not in this checkout")
    assert main(["train", "preview-decoder", "--smoke", "--out", str(tmp_path / "run")]) == 2
    assert "needs --export-to" in capsys.readouterr().err
    export = tmp_path / "export"
    command = ["train", "preview-decoder", "--smoke", "--out", str(tmp_path / "run"), "--export-to", str(export)]
    assert main(command) == 0
    assert "PSNR tiny vs VAE" in capsys.readouterr().out
    report = json.loads((export / "report.json").read_text())
    assert 0 <= report["attribute_accuracy_tiny"] <= 1 and report["decode_ms_batch1_tiny"] > 0
    assert (export / "diffusion_pytorch_model.safetensors").exists()
    assert load_pair("embedded", preview_decoder=str(export)).edge.preview_vae is not None

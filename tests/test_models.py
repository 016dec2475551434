"""Model loading: presets, local folders, missing and corrupt weights, real-architecture configs."""

import json

import pytest
import torch

from diffusionx import InvalidInputError, ModelNotAvailableError
from diffusionx.models import load_pair, unet_config


def test_unknown_preset_lists_the_choices():
    with pytest.raises(InvalidInputError, match="sd15"):
        load_pair("sd-xl-turbo")


def test_untrained_pair_is_labelled(untrained_pair):
    described = untrained_pair.describe()
    assert described["untrained"] and not described["random_weight"]
    assert described["edge"]["status"] == described["cloud"]["status"] == "untrained"
    assert untrained_pair.shared_latent_space
    # The edge U-Net is the small one, as Tiny-SD is to SD v1.5.
    assert untrained_pair.cloud_info.unet_params > 4 * untrained_pair.edge_info.unet_params


@pytest.fixture(scope="module")
def saved_folder(untrained_pair, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from diffusionx.engine import make_scheduler

    e = untrained_pair.edge
    pipe = StableDiffusionPipeline(
        vae=e.vae,
        text_encoder=e.text_encoder,
        tokenizer=e.tokenizer,
        unet=e.unet,
        scheduler=make_scheduler("ddim", e.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_local_folder_loads_and_matches(untrained_pair, saved_folder):
    pair = load_pair(edge=str(saved_folder), cloud=str(saved_folder))
    assert pair.edge_info.status == "pretrained" and pair.shared_latent_space
    a = pair.edge.generate("a ring", seed=1, steps=3, decode=False).latents
    b = untrained_pair.edge.generate("a ring", seed=1, steps=3, decode=False).latents
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_corrupt_weights_name_the_file(saved_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_folder, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelNotAvailableError, match=str(weights.name)):
        load_pair(edge=str(broken), cloud=str(saved_folder))
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelNotAvailableError, match=r"model_index\.json is missing"):
        load_pair(edge=str(broken), cloud=str(saved_folder))


def test_not_a_folder_nor_an_id():
    with pytest.raises(ModelNotAvailableError, match="neither a local folder"):
        load_pair(edge="./no/such/folder")


@pytest.mark.parametrize(
    ("name", "millions"),
    [("sd15", 859.5), ("tiny_sd", 323.4)],
)
def test_real_architecture_configs_have_the_published_sizes(name, millions):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(name))
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_shipped_configs_are_plain_json():
    from diffusionx.models import CONFIGS

    for path in CONFIGS.glob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path

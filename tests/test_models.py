"""Model loading: presets, local folders, missing and corrupt weights, real-architecture configs."""

import json
import os

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


def test_the_embedded_pair_samples_its_own_default_steps(embedded_pair, untrained_pair):
    from diffusionx.models import DEFAULT_STEPS, EMBEDDED_DIR
    from diffusionx.session import EdgeSession

    shipped = json.loads((EMBEDDED_DIR / "pair.json").read_text())["default_steps"]
    assert embedded_pair.default_steps == shipped == 10  # what the policy defaults were tuned at
    assert untrained_pair.default_steps == DEFAULT_STEPS == 20
    session = EdgeSession(embedded_pair)
    assert session.steps == session.cloud_steps == 10
    assert session.generate("a red circle").steps == 10
    assert EdgeSession(embedded_pair, steps=20).steps == 20  # an explicit count wins


def test_the_embedded_pair_names_the_policy_tuned_on_it(embedded_pair, untrained_pair):
    from diffusionx.models import DEFAULT_POLICY, EMBEDDED_DIR
    from diffusionx.predictors.specs import is_predictor_spec

    shipped = json.loads((EMBEDDED_DIR / "pair.json").read_text())["default_policy"]
    assert embedded_pair.default_policy == shipped == "learned" and is_predictor_spec(shipped)
    assert untrained_pair.default_policy == DEFAULT_POLICY == "fixed"  # no predictor was tuned on it


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


def test_two_folders_with_the_same_vae_share_the_latent_space(saved_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(saved_folder, copy)
    # Same weights loaded from two places: `_name_or_path` differs, the latent space does not.
    assert load_pair(edge=str(saved_folder), cloud=str(copy)).shared_latent_space
    weights = next((copy / "vae").glob("*.safetensors"))
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = state[first] + 0.01
    save_file(state, str(weights))
    assert not load_pair(edge=str(saved_folder), cloud=str(copy)).shared_latent_space


def test_sd15_preset_from_a_hub_layout_cache_hands_latents_over(saved_folder, tmp_path):
    """The `sd15` preset offline, from a cache laid out as the hub writes it (stand-in weights):
    both sides hold the same VAE, so the preview's latent goes up, not a PNG."""
    import shutil
    import subprocess
    import sys

    from diffusionx.presets import PRESETS

    hub = tmp_path / "hf" / "hub"
    for repo in PRESETS["sd15"]:
        root = hub / f"models--{repo.replace('/', '--')}"
        shutil.copytree(saved_folder, root / "snapshots" / "0123abcd")
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0123abcd")
    code = "from diffusionx.models import load_pair; print(load_pair('sd15').shared_latent_space)"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True"


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
    with pytest.raises(InvalidInputError, match="neither a local folder"):
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

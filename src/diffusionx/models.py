"""Model pairs: an edge (small) and a cloud (large) Stable Diffusion model.

A pair comes from a preset name, a Hugging Face id, a local diffusers folder, or the embedded
pair shipped in this repo. `random-sd15` builds the real SD v1.5 and Tiny-SD architectures from
their public configs with random weights, to measure latency where weights cannot be had.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch

from .engine import Engine
from .errors import InvalidInputError, ModelNotAvailableError
from .presets import PRESETS, SD15

T = TypeVar("T")

ASSETS = Path(str(resources.files("diffusionx") / "assets"))
CONFIGS = Path(str(resources.files("diffusionx") / "configs"))
EMBEDDED_DIR = ASSETS / "embedded"
TOKENIZER_DIR = ASSETS / "tokenizer"
# Scheduler steps and strength policy (diffusionx.predictors.specs) when a caller names none: the
# embedded pair's pair.json sets its own (`default_steps`, `default_policy`: the predictors were
# tuned on it); every other pair renders at 20 steps with fixed strengths.
DEFAULT_STEPS = 20
DEFAULT_POLICY = "fixed"
REBUILD_HINT = (
    "Restore it with `git checkout -- src/diffusionx/assets/embedded` or rebuild it with "
    "`diffusionx train embedded` (about 2-3 hours on 2 CPU cores)."
)


@dataclass(frozen=True)
class ModelInfo:
    role: str  # "edge" | "cloud"
    source: str
    status: str  # "trained" (embedded), "pretrained" (hub/folder), "untrained", "random-weight"
    unet_params: int

    @property
    def label(self) -> str:
        return f"{self.source} [{self.status}]"


@dataclass
class ModelPair:
    name: str
    edge: Engine
    cloud: Engine
    edge_info: ModelInfo
    cloud_info: ModelInfo
    shared_latent_space: bool
    default_steps: int = DEFAULT_STEPS
    default_policy: str = DEFAULT_POLICY

    def steps_or_default(self, steps: int | None) -> int:
        """`steps` when a caller names them, else this pair's `default_steps`."""
        return self.default_steps if steps is None else steps

    def describe(self) -> dict[str, Any]:
        """What a report should say about the models, including untrained/random-weight marks."""
        return {
            "pair": self.name,
            "edge": asdict(self.edge_info),
            "cloud": asdict(self.cloud_info),
            "shared_latent_space": self.shared_latent_space,
            "untrained": "untrained" in (self.edge_info.status, self.cloud_info.status),
            "random_weight": "random-weight" in (self.edge_info.status, self.cloud_info.status),
        }


def call_in_short_lived_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on a thread that ends when it returns (its exception re-raised here).

    `load_pair` loads through this. The OpenMP team that a thread's torch ops start lives as long
    as the thread, and the main thread lives as long as the process: a model loaded there leaves a
    team beside the one of whichever thread then runs it (a server's step loop, the UI's render
    thread), the process has more OpenMP threads than cores, and libgomp stops spinning between
    parallel regions for every team. Measured on 2 cores: the embedded cloud U-Net's step at batch 1
    took 73-92 ms after a load on the main thread and 34-41 ms after a load here (docs/serving.md)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=target, name="diffusionx-loader")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def load_pair(
    preset: str = "embedded",
    *,
    edge: str | None = None,
    cloud: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    preview_decoder: str | None = "default",
) -> ModelPair:
    """Load a pair by preset name; `edge` / `cloud` override either side with an HF id or folder.

    `preview_decoder`: a tiny decoder (`AutoencoderTiny` folder or HF id, e.g. madebyollin/taesd
    for SD v1.5's latents) the edge decodes its previews with; "default" is the one the embedded
    pair ships (for random-sd15, TAESD's architecture with random weights, for timing; none for
    other pairs), None decodes previews with the VAE."""
    if preset not in PRESETS:
        raise InvalidInputError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    edge_source, cloud_source = PRESETS[preset]
    edge_source, cloud_source = edge or edge_source, cloud or cloud_source
    name = preset if (edge, cloud) == (None, None) else f"{edge_source} + {cloud_source}"

    if edge_source == "builtin:embedded-edge" and not (EMBEDDED_DIR / "pair.json").exists():
        warnings.warn(
            "the trained embedded pair is not in this checkout; using the UNTRAINED stand-in pair "
            "(random weights in the embedded architecture): its images are noise. " + REBUILD_HINT,
            stacklevel=2,
        )
        edge_source, cloud_source = PRESETS["untrained"]
        name = "untrained"

    if preview_decoder == "default":
        shipped = EMBEDDED_DIR / "preview_decoder"
        defaults = {"builtin:embedded-edge": str(shipped) if shipped.exists() else None,
                    "builtin:random-tiny-sd": "builtin:random-taesd"}
        preview_decoder = defaults.get(edge_source)

    def load_sides():
        edge_engine, edge_info = _load_side(edge_source, "edge", device, dtype, shared=None)
        if preview_decoder is not None:
            edge_engine.preview_vae = load_preview_decoder(preview_decoder, edge_engine, device, dtype)
        shared = edge_engine if _shares_components(edge_source, cloud_source) else None
        return edge_engine, edge_info, *_load_side(cloud_source, "cloud", device, dtype, shared=shared)

    # the OpenMP team the load starts ends with its thread (see call_in_short_lived_thread)
    edge_engine, edge_info, cloud_engine, cloud_info = call_in_short_lived_thread(load_sides)
    return ModelPair(
        name=name,
        edge=edge_engine,
        cloud=cloud_engine,
        edge_info=edge_info,
        cloud_info=cloud_info,
        shared_latent_space=_same_latent_space(edge_engine, cloud_engine),
        **(_embedded_defaults() if name == "embedded" else {}),
    )


def _embedded_defaults() -> dict[str, Any]:
    """pair.json's `default_steps` and `default_policy`: the embedded pair renders as well at 10
    steps as at 20 (benchmarks/results/steps_quality_pair5_n128.txt), and the shipped predictors
    were tuned on it at 10 (docs/predictors.md)."""
    manifest = json.loads((EMBEDDED_DIR / "pair.json").read_text())
    return {"default_steps": int(manifest.get("default_steps", DEFAULT_STEPS)),
            "default_policy": str(manifest.get("default_policy", DEFAULT_POLICY))}


def load_preview_decoder(source: str, edge: Engine, device: str, dtype: torch.dtype):
    """An `AutoencoderTiny` for `edge`'s previews; it must decode the edge VAE's latents."""
    from diffusers import AutoencoderTiny

    if source == "builtin:random-taesd":
        return AutoencoderTiny().to(device, dtype)  # diffusers' defaults are TAESD's architecture
    try:
        try:
            decoder = AutoencoderTiny.from_pretrained(source, local_files_only=True)
        except OSError:
            decoder = AutoencoderTiny.from_pretrained(source)
    except (OSError, ValueError) as err:
        why = str(err).splitlines()[0]
        if not Path(source).expanduser().exists():  # a hub id ("owner/name") may also be a relative folder
            why = "no such folder" if _looks_like_path(source) else f"no such folder; as a hub id: {why}"
        raise ModelNotAvailableError(
            f"cannot load the preview decoder {source!r} ({why}); give an AutoencoderTiny folder or HF id, "
            "or leave previews to the VAE (--preview-decoder none)") from None
    channels = edge.vae.config.latent_channels
    if decoder.config.latent_channels != channels:
        raise InvalidInputError(
            f"the preview decoder {source!r} decodes {decoder.config.latent_channels}-channel latents, the edge's VAE "
            f"makes {channels}-channel ones: use a decoder trained for this VAE (diffusionx train preview-decoder)")
    return decoder.to(device, dtype)


def _looks_like_path(source: str) -> bool:
    """Not a hub id ("owner/name")."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1


def _shares_components(edge_source: str, cloud_source: str) -> bool:
    # Builtin pairs share one text encoder and VAE by construction, as Tiny-SD and SD v1.5 do.
    return edge_source.startswith("builtin:") and cloud_source.startswith("builtin:")


def latent_space_config(vae) -> dict[str, Any]:
    """The VAE config fields that define its latents: everything but bookkeeping such as
    `_name_or_path` (where it was loaded from) or `_diffusers_version`."""
    return {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}


def _same_latent_space(edge: Engine, cloud: Engine) -> bool:
    """Latents can be handed over directly when both sides use the same VAE (same config, same weights)."""
    if edge.vae is cloud.vae:
        return True
    if type(edge.vae) is not type(cloud.vae) or latent_space_config(edge.vae) != latent_space_config(cloud.vae):
        return False
    a, b = edge.vae.state_dict(), cloud.vae.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load_side(source: str, role: str, device: str, dtype: torch.dtype, shared: Engine | None):
    if source.startswith("builtin:"):
        kind = source.removeprefix("builtin:")
        if kind.startswith("embedded-"):
            pipe = load_pipeline(EMBEDDED_DIR / kind.removeprefix("embedded-"), dtype=dtype, shared=shared)
            status = "trained"
        elif kind.startswith("untrained-"):
            pipe = build_untrained_side(kind.removeprefix("untrained-"), shared=shared)
            status = "untrained"
        elif kind in ("random-sd15", "random-tiny-sd"):
            pipe = build_random_sd_side(kind, shared=shared)
            status = "random-weight"
        else:
            raise InvalidInputError(f"unknown builtin model {source!r}")
    else:
        pipe = load_pipeline(source, dtype=dtype)
        status = "pretrained"
    engine = Engine(name=f"{role}:{source.removeprefix('builtin:')}", **pipe)
    for module in (engine.unet, engine.vae, engine.text_encoder):
        if module.device != torch.device(device) or module.dtype != dtype:
            module.to(device, dtype)
    params = sum(p.numel() for p in engine.unet.parameters())
    return engine, ModelInfo(role=role, source=source.removeprefix("builtin:"), status=status, unet_params=params)


def _components(pipe) -> dict[str, Any]:
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler_config": pipe.scheduler.config,
    }


def load_pipeline(source: str | Path, *, dtype: torch.dtype = torch.float32, shared: Engine | None = None):
    """Load a StableDiffusionPipeline from a folder or HF id and return its components.

    The local cache is tried first (no network); only then the hub. Failures become one
    ModelNotAvailableError that names the model and says how to get it."""
    from diffusers import StableDiffusionPipeline

    if os.environ.get("DIFFUSIONX_LOADING_BARS") == "0":  # the CLI without -v
        _hide_loading_bars()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if shared is not None:
        kwargs.update(text_encoder=shared.text_encoder, vae=shared.vae, tokenizer=shared.tokenizer)
    folder = Path(source)
    if folder.exists():
        _check_folder(folder)
        try:
            return _components(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs))
        except Exception as err:
            raise ModelNotAvailableError(f"could not load the model in {folder}: {err}. {_hint(folder)}") from None
    if str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise InvalidInputError(
            f"model {source!r} is neither a local folder nor a Hugging Face id (owner/name). "
            "Pass a diffusers folder (with model_index.json) or an id such as " + SD15
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    attempts = [True] if offline else [True, False]
    last_error: Exception | None = None
    for local_only in attempts:
        try:
            return _components(StableDiffusionPipeline.from_pretrained(source, local_files_only=local_only, **kwargs))
        except Exception as err:
            last_error = err
    raise ModelNotAvailableError(
        f"model {source!r} is not in the local Hugging Face cache and could not be downloaded "
        f"({type(last_error).__name__}: {str(last_error).splitlines()[0][:200]}). "
        f"Fix: run once with network access (e.g. `huggingface-cli download {source}`), or pass a local "
        "diffusers folder, or use the offline default `--model embedded`."
    ) from None


def _hide_loading_bars() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _hint(folder: Path) -> str:
    return (
        REBUILD_HINT
        if folder.resolve().is_relative_to(EMBEDDED_DIR.resolve())
        else ("Re-download or re-export that folder (a diffusers StableDiffusionPipeline folder).")
    )


def _check_folder(folder: Path) -> None:
    """Name the missing or corrupt file before diffusers fails somewhere deep inside."""
    from safetensors import safe_open

    index = folder / "model_index.json"
    if not index.exists():
        raise ModelNotAvailableError(f"{index} is missing: not a diffusers pipeline folder. {_hint(folder)}")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotAvailableError(f"{index} is not valid JSON ({err}). {_hint(folder)}") from None
    for name in ("unet", "vae", "text_encoder"):
        if name not in components:
            continue
        sub = folder / name
        weights = sorted(sub.glob("*.safetensors"))
        if not weights:
            raise ModelNotAvailableError(f"no .safetensors weights in {sub}. {_hint(folder)}")
        for path in weights:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                        f.get_slice(key)
            except Exception as err:
                raise ModelNotAvailableError(f"weights file {path} is corrupt ({err}). {_hint(folder)}") from None


def _config(name: str) -> dict[str, Any]:
    config = json.loads((CONFIGS / name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _build_side(unet_config: str, text_config: str, vae_config: str, scheduler: str, seed: int, shared):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_config(unet_config))
    if shared is not None:
        text_encoder, vae, tokenizer = shared.text_encoder, shared.vae, shared.tokenizer
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config(text_config)))
        vae = AutoencoderKL.from_config(_config(vae_config))
        tokenizer = _tokenizer()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": _config(scheduler),
    }


def build_untrained_side(role: str, shared: Engine | None = None) -> dict[str, Any]:
    """The embedded architecture with random weights: a stand-in, labelled 'untrained'."""
    return _build_side(
        f"embedded_unet_{role}.json",
        "embedded_text_encoder.json",
        "embedded_vae.json",
        "embedded_scheduler.json",
        seed=0 if role == "edge" else 1,
        shared=shared,
    )


def build_random_sd_side(kind: str, shared: Engine | None = None) -> dict[str, Any]:
    """SD v1.5 (cloud) or Tiny-SD (edge) U-Net from the public configs, random weights; SD VAE and
    CLIP ViT-L text encoder architectures. For latency only: the images mean nothing."""
    unet = "sd15_unet.json" if kind == "random-sd15" else "tiny_sd_unet.json"
    return _build_side(
        unet, "clip_vit_l_text_encoder.json", "sd_vae.json", "sd15_scheduler.json", seed=0, shared=shared
    )


def unet_config(name: str) -> dict[str, Any]:
    """A shipped U-Net architecture config: 'sd15', 'tiny_sd', 'embedded_edge', 'embedded_cloud'."""
    files = {
        "sd15": "sd15_unet.json",
        "tiny_sd": "tiny_sd_unet.json",
        "embedded_edge": "embedded_unet_edge.json",
        "embedded_cloud": "embedded_unet_cloud.json",
    }
    if name not in files:
        raise InvalidInputError(f"unknown U-Net config {name!r}; choose one of {', '.join(files)}")
    return _config(files[name])

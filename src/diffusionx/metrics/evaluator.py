"""The embedded evaluator: CLIP-style score, FID features and attribute accuracy.

Weights: ``diffusionx/assets/evaluator/evaluator.safetensors`` (config and word list in the
file's metadata). Rebuild with ``diffusionx train evaluator``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fid import frechet_distance
from .model import N_CELLS, EvaluatorConfig, EvaluatorNet
from .text import WordTokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "evaluator"
WEIGHTS_NAME = "evaluator.safetensors"
REBUILD_COMMAND = "diffusionx train evaluator"
IMAGE_SIZE = 64
FEATURE_DIM = 256  # evaluator.image_features(...).shape[1]; the FID feature space


class EvaluatorWeightsError(RuntimeError):
    """The evaluator's weight file is missing or unreadable."""


def default_weights_path() -> Path:
    return ASSET_DIR / WEIGHTS_NAME


def _to_uint8_batch(images: Any) -> np.ndarray:
    """uint8 (N, H, W, 3) / (H, W, 3) arrays, or a list of arrays or PIL images -> (N, 64, 64, 3)."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) or (H, W, 3) images, got shape {images.shape}")
        items: Sequence[Any] = list(arr)
    elif isinstance(images, Image.Image):
        items = [images]
    else:
        items = list(images)
    out = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            pil = item.convert("RGB")
        else:
            a = np.asarray(item)
            if a.dtype != np.uint8:
                if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0 + 1e-6:
                    a = a * 255.0
                a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=-1)
            if a.ndim != 3 or a.shape[-1] not in (3, 4):
                raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
            a = a[..., :3]
            if a.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
                out[i] = a
                continue
            pil = Image.fromarray(np.ascontiguousarray(a))
        if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
            pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
        out[i] = np.asarray(pil)
    return out


def images_to_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


class Evaluator:
    """The trained evaluator. Construct with `Evaluator.load()`."""

    def __init__(self, net: EvaluatorNet, tokenizer: WordTokenizer, device: str | torch.device = "cpu") -> None:
        self.net = net.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = 256

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
        """Load the shipped evaluator (or the weight file at `path`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = Path(path) if path is not None else default_weights_path()
        if file.is_dir():
            file = file / WEIGHTS_NAME
        hint = f"rebuild it with `{REBUILD_COMMAND}`"
        if not file.is_file():
            raise EvaluatorWeightsError(f"evaluator weights not found: {file}; {hint}")
        try:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
            cfg = EvaluatorConfig.from_dict(json.loads(meta["config"]))
            tokenizer = WordTokenizer(json.loads(meta["words"]))
            state = load_file(str(file))
            net = EvaluatorNet(cfg)
            net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
            raise EvaluatorWeightsError(
                f"evaluator weights are corrupt or incompatible: {file} ({exc}); {hint}"
            ) from exc
        return cls(net, tokenizer, device)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        file = Path(path)
        if file.suffix != ".safetensors":
            file = file / WEIGHTS_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().to("cpu", torch.float16).contiguous()
            for k, v in self.net.state_dict().items()
            if v.is_floating_point()
        }
        ints = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items() if not v.is_floating_point()}
        meta = {
            "config": json.dumps(self.net.cfg.to_dict()),
            "words": json.dumps(self.tokenizer.words[3:]),
            "format": "diffusionx-evaluator-v1",
        }
        save_file({**state, **ints}, str(file), metadata=meta)
        return file

    # ---------------------------------------------------------------- embeddings
    @torch.no_grad()
    def _image_outputs(self, images: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = _to_uint8_batch(images)
        feats, embeds, attrs = [], [], []
        for start in range(0, len(batch), self.batch_size):
            x = images_to_tensor(batch[start : start + self.batch_size]).to(self.device)
            f, e, a = self.net.image(x)
            feats.append(f.cpu())
            embeds.append(e.cpu())
            attrs.append(a.cpu())
        if not feats:
            empty = torch.zeros(0)
            return empty, empty, empty
        return torch.cat(feats), torch.cat(embeds), torch.cat(attrs)

    def image_features(self, images: Any) -> np.ndarray:
        """(N, 256) float32 image features, the feature space of `fid`."""
        return self._image_outputs(images)[0].numpy().astype(np.float32)

    @torch.no_grad()
    def image_embeddings(self, images: Any) -> np.ndarray:
        """(N, 128) unit-norm embeddings in the joint image-text space."""
        return self.net.normalize(self._image_outputs(images)[1]).numpy()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, 128) unit-norm embeddings of prompts (any text; unknown words are <unk>)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids = torch.from_numpy(self.tokenizer.encode(prompts[start : start + self.batch_size]))
            out.append(self.net.normalize(self.net.text(ids.to(self.device))).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.net.cfg.embed_dim), np.float32)

    def clip_score(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """Per-pair score: 100 x cosine(image, prompt), clipped at 0 (as CLIPScore)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        img = self.image_embeddings(images)
        if len(img) != len(prompts):
            raise ValueError(f"{len(img)} images but {len(prompts)} prompts")
        txt = self.text_embeddings(prompts)
        return np.clip(100.0 * (img * txt).sum(axis=1), 0.0, None).astype(np.float32)

    def similarity(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """(N_images, N_prompts) cosine similarities, for retrieval."""
        return self.image_embeddings(images) @ self.text_embeddings(prompts).T

    # ---------------------------------------------------------------- FID
    def fid(self, images: Any, reference_images: Any) -> float:
        """Frechet distance between the evaluator's features of `images` and of `reference_images`."""
        return frechet_distance(self.image_features(images), self.image_features(reference_images))

    # ---------------------------------------------------------------- attributes
    @torch.no_grad()
    def predict_attributes(self, images: Any) -> list[dict[str, Any]]:
        """Per image: {"background": color, "objects": {position: {"shape","color","size","p"}}}
        with an object at every grid position whose presence probability is > 0.5."""
        from ..world.vocab import COLORS, POSITIONS, SHAPES, SIZES

        logits = self._image_outputs(images)[2]
        if logits.numel() == 0:
            return []
        parts = self.net.split_attr(logits)
        present = torch.sigmoid(parts["present"]).numpy()
        shape = parts["shape"].argmax(-1).numpy()
        color = parts["color"].argmax(-1).numpy()
        size = parts["size"].argmax(-1).numpy()
        background = parts["background"].argmax(-1).numpy()
        out = []
        for i in range(len(present)):
            objects = {
                POSITIONS[c]: {
                    "shape": SHAPES[shape[i, c]],
                    "color": COLORS[color[i, c]],
                    "size": SIZES[size[i, c]],
                    "p": float(present[i, c]),
                }
                for c in range(N_CELLS)
                if present[i, c] > 0.5
            }
            out.append({"background": COLORS[background[i]], "objects": objects})
        return out

    def attribute_accuracy_scenes(self, images: Any, scenes: Sequence[Any]) -> dict[str, Any]:
        """Attribute accuracy against known scene graphs (see `attribute_accuracy`)."""
        preds = self.predict_attributes(images)
        if len(preds) != len(scenes):
            raise ValueError(f"{len(preds)} images but {len(scenes)} scenes")
        return aggregate_checks([score_scene(p, s) for p, s in zip(preds, scenes)])

    def attribute_accuracy(self, images: Any, prompts: Sequence[str]) -> dict[str, Any]:
        """Does each image show what its prompt names?

        Each prompt is parsed with `world.parse_prompt` into the (possibly partial) scene it
        names, and only what it names is checked (see `score_scene`). For every object: if
        its position is named, *position* (the image has an object at that grid position) and
        its named *shape*, *color*, *size* on the object detected there (these fail when no
        object is detected there); if not, its named shape, color and size together on one
        detected object elsewhere, the one matching the most of them. Plus one *background*
        check when the prompt names the background. Objects in the image that the prompt does
        not name are not penalised. An image's score is passed checks / checks; `mean` is the mean of
        image scores over parseable prompts. Prompts that do not parse are not scored: they
        are counted in `n_unparseable`, listed (index, prompt) in `unparseable`, and their
        per-image score is None.

        Returns {"mean", "per_image", "per_attribute" (accuracy of each check kind over all
        checks), "exact" (fraction of images passing every check), "n_scored",
        "n_unparseable", "unparseable", "results" (each image's `score_scene` result or None)}.
        """
        from ..world import parse_prompt

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = _to_uint8_batch(images)
        if len(batch) != len(prompts):
            raise ValueError(f"{len(batch)} images but {len(prompts)} prompts")
        scenes = []
        unparseable = []
        for i, prompt in enumerate(prompts):
            try:
                scene = parse_prompt(prompt)
            except Exception:  # a prompt the world cannot read is just unparseable
                scene = None
            if scene is None:
                unparseable.append((i, prompt))
            scenes.append(scene)
        keep = [i for i, s in enumerate(scenes) if s is not None]
        preds = self.predict_attributes(batch[keep]) if keep else []
        results: list[dict[str, Any] | None] = [None] * len(prompts)
        for i, pred in zip(keep, preds):
            results[i] = score_scene(pred, scenes[i])
        return {**aggregate_checks(results, unparseable), "results": results}


CHECKS = ("position", "shape", "color", "size", "background")
OBJECT_CHECKS = ("shape", "color", "size")


def score_scene(pred: dict[str, Any], scene: Any) -> dict[str, Any]:
    """Checks of one predicted image against one (parsed, possibly partial) scene graph.

    Only what the scene names is checked. An object with a named position is read at that grid
    cell (its position check: something is detected there). Objects without a named position
    are matched to detected objects elsewhere, each to its own one, so that together they match
    the most named attributes; each such object's shape, color and size are all checked on the
    one detected object it is matched to (all fail when there is none left for it).
    """
    found_at = pred["objects"]
    checks: list[tuple[str, int, bool]] = []  # (check kind, index of the named object or -1, passed)
    pairs: list[tuple[int, Any, dict[str, Any] | None]] = []  # (index, named object, the detected one)
    unplaced = []
    for index, obj in enumerate(scene.objects):
        position = getattr(obj, "position", None)
        if position is None:
            unplaced.append((index, obj))
            continue
        found = found_at.get(position)
        checks.append(("position", index, found is not None))
        pairs.append((index, obj, found))
    if unplaced:
        named_cells = {getattr(o, "position", None) for o in scene.objects}
        free = [found for cell, found in found_at.items() if cell not in named_cells]
        matched = _match_unplaced([obj for _, obj in unplaced], free)
        pairs.extend((index, obj, found) for (index, obj), found in zip(unplaced, matched))
    for index, obj, found in sorted(pairs, key=lambda p: p[0]):
        for attr in OBJECT_CHECKS:
            want = getattr(obj, attr, None)
            if want is not None:
                checks.append((attr, index, found is not None and found[attr] == want))
    background = getattr(scene, "background", None)
    if background is not None:
        checks.append(("background", -1, pred["background"] == background))
    passed = {kind: sum(ok for k, _, ok in checks if k == kind) for kind in CHECKS}
    total = {kind: sum(k == kind for k, _, _ in checks) for kind in CHECKS}
    n = len(checks)
    return {"score": sum(passed.values()) / n if n else 1.0, "passed": passed, "total": total, "checks": checks}


def attributes_kept(before: dict[str, Any] | None, after: dict[str, Any] | None) -> float | None:
    """Of the checks `before` passed (a preview against its prompt), the share `after` (the final
    of the same prompt) still passes; None when nothing to keep or either is unscored."""
    if before is None or after is None:
        return None
    right = {(kind, index) for kind, index, ok in before["checks"] if ok}
    if not right:
        return None
    still = {(kind, index) for kind, index, ok in after["checks"] if ok}
    return len(right & still) / len(right)


def _match_unplaced(objects: list, detected: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """For each object, its own detected object (or None when none is left), chosen so that the
    objects match the most named shape / color / size values in all; ties go to detection order."""
    from itertools import permutations

    slots: list[dict[str, Any] | None] = [*detected, *([None] * len(objects))]
    gain = [
        [0 if found is None else sum(getattr(obj, a, None) == found[a] for a in OBJECT_CHECKS) for found in slots]
        for obj in objects
    ]
    best, best_score = None, -1
    for choice in permutations(range(len(slots)), len(objects)):
        score = sum(gain[i][k] for i, k in enumerate(choice))
        if score > best_score:
            best, best_score = choice, score
    assert best is not None
    return [slots[k] for k in best]


def aggregate_checks(results: Sequence[dict[str, Any] | None], unparseable: Sequence = ()) -> dict[str, Any]:
    """Mean score, per-check accuracy and counts over `score_scene` results (None: unscored)."""
    scored = [r for r in results if r is not None]
    per_attr = {}
    for check in CHECKS:
        t = sum(r["total"][check] for r in scored)
        per_attr[check] = sum(r["passed"][check] for r in scored) / t if t else None
    return {
        "mean": float(np.mean([r["score"] for r in scored])) if scored else None,
        "per_image": [None if r is None else r["score"] for r in results],
        "per_attribute": per_attr,
        "exact": float(np.mean([r["score"] == 1.0 for r in scored])) if scored else None,
        "n_scored": len(scored),
        "n_unparseable": len(unparseable),
        "unparseable": [{"index": i, "prompt": p} for i, p in unparseable],
    }


@lru_cache(maxsize=1)
def get_evaluator() -> Evaluator:
    """The shipped evaluator, loaded once per process."""
    return Evaluator.load()


def fid(images: Any, reference_images: Any, evaluator: Evaluator | None = None) -> float:
    """FID in the shipped evaluator's 256-d image-feature space."""
    return (evaluator or get_evaluator()).fid(images, reference_images)

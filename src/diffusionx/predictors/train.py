"""`diffusionx predictors train`: fit the MLP and the gradient-boosted trees on the train rows,
compare them on the held-out rows (validation, and test if collected), ship the better one.

Per direction the target is the gap curve q(s) - q(1.0) at the grid strengths below 1.0.
Reported per model and per baseline (fixed strengths, similarity rule, oracle):
  curve_mae    mean |predicted gap - measured gap| over the grid (models only);
  label_mae    mean |chosen strength - oracle label| at eps (the strength MAE);
  gap          mean measured gap at the chosen strength (quality vs the reference; 0 = as good);
  within_eps   fraction of cases whose measured gap at the chosen strength is >= -eps;
  strength     mean chosen strength; steps_saved = 1 - mean steps / steps at strength 1.
The `train-mean-curve` baseline predicts the train rows' mean gap curve for every case (no
features): a model that does not beat it has learned nothing from its features.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .collect import read_rows
from .curves import DEFAULT_EPS, choose_strength, label, row_gaps
from .policies import MANIFEST, SimilarityRule
from .regressors import MLPRegressor, TreesRegressor, load_regressor

FIXED = (0.3, 0.5, 0.7, 1.0)


def table(rows: list[dict], kind: str, splits: tuple[str, ...], score_weight: float = 1.0):
    """(features X, gap curves G (incl. the 0 at 1.0), rows) of one direction and some splits."""
    sel = [r for r in rows if r.get("kind") == kind and r.get("split") in splits]
    if not sel:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0)), sel
    x = np.asarray([r["features"] for r in sel], np.float32)
    g = np.asarray([row_gaps(r, score_weight) for r in sel])
    return x, g, sel


def evaluate_choices(
    chosen: np.ndarray, gaps: np.ndarray, grid: list[float], eps: float, steps: int = 20
) -> dict[str, float]:
    chosen = np.asarray(chosen, dtype=np.float64)
    idx = np.abs(chosen[:, None] - np.asarray(grid)[None, :]).argmin(1)  # nearest grid point
    realized = gaps[np.arange(len(gaps)), idx]
    oracle = np.array([label(g, eps, grid) for g in gaps])
    n_steps = np.ceil(np.asarray(chosen) * steps - 1e-9)
    return {
        "label_mae": float(np.mean(np.abs(chosen - oracle))),
        "gap": float(realized.mean()),
        "within_eps": float(np.mean(realized >= -eps - 1e-9)),
        "strength": float(np.mean(chosen)),
        "steps_saved": float(1.0 - n_steps.mean() / steps),
    }


def _similarity_choices(sel: list[dict], names: list[str], rule: SimilarityRule | None = None) -> np.ndarray:
    rule = rule or SimilarityRule()
    i = names.index("sentence_cos")
    return np.array([rule.strength_for(r["features"][i]) for r in sel])


def fit_similarity_rule(sel: list[dict], gaps: np.ndarray, names: list[str], eps: float, grid: list[float]):
    """The rule's (low, min_strength) with the smallest strength MAE vs the oracle on these rows."""
    oracle = np.array([label(g, eps, grid) for g in gaps])
    best = None
    for low in np.arange(0.0, 0.95, 0.05):
        for min_strength in np.arange(0.1, 0.75, 0.1):
            rule = SimilarityRule(low=float(low), min_strength=float(min_strength))
            mae = float(np.mean(np.abs(_similarity_choices(sel, names, rule) - oracle)))
            if best is None or mae < best[0] - 1e-12:
                best = (mae, rule)
    return best[1]


def train_predictors(
    data: str | Path | list[str | Path],
    out: str | Path,
    *,
    eps: float = DEFAULT_EPS,
    score_weight: float = 1.0,
    refit_all: bool = True,
    text_encoder: str = "embedded",
    feature_names: dict[str, list[str]] | None = None,
    seed: int = 0,
    progress: bool = True,
    directions: tuple[str, ...] = ("edge", "cloud"),
) -> dict[str, Any]:
    """Fit, compare and ship the predictors of `directions`; a direction left out keeps the model
    (and report section) already in `out` (e.g. the edge retrained on DAgger rows, the cloud not)."""
    if not directions or set(directions) - {"edge", "cloud"}:
        raise ValueError(f"directions must be edge and/or cloud, not {directions!r}")
    files = [data] if isinstance(data, (str, Path)) else list(data)
    rows: list[dict] = []
    for f in files:
        rows.extend(read_rows(f))
    headers = [r for r in rows if r.get("kind") == "header"]
    if not headers:
        raise ValueError(f"no sweep table in {files}: run `diffusionx predictors collect` first")
    grid = [float(s) for s in headers[0]["grid"]]
    steps = int(headers[0].get("steps", 20))
    feature_names = feature_names or headers[0].get("feature_names")
    held_out = tuple(sorted({r["split"] for r in rows if r.get("kind") in ("edge", "cloud")} - {"train"}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "eps": eps,
        "score_weight": score_weight,
        "grid": grid,
        "held_out": list(held_out),
        "data": [str(f) for f in files],
        "directions": {},
    }
    manifest: dict[str, Any] = {
        "format": "diffusionx-predictors-v1",
        "grid": grid,
        "text_encoder": text_encoder,
        "score_weight": score_weight,
        "models": headers[0].get("models"),
        "feature_names": feature_names or {},
    }
    kept = [kind for kind in ("edge", "cloud") if kind not in directions]
    if kept:
        try:
            old_manifest = json.loads((out / MANIFEST).read_text())
            old_report = json.loads((out / "train_report.json").read_text())
            if [float(v) for v in old_manifest["grid"]] != grid:
                raise ValueError(f"the predictor kept in {out} uses the grid {old_manifest['grid']}, "
                                 f"these sweeps {grid}: collect with the same --strengths or train both")
            for kind in kept:
                manifest[kind] = old_manifest[kind]
                report["directions"][kind] = old_report["directions"][kind]
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"training only {', '.join(directions)} keeps the other predictor from {out}, "
                             f"but there is none to keep ({err}): train both directions first") from None
    for kind in directions:
        x_tr, g_tr, _ = table(rows, kind, ("train",), score_weight)
        if len(x_tr) < 2:
            raise ValueError(f"only {len(x_tr)} {kind} training rows: collect more sessions")
        y_tr = g_tr[:, :-1]
        direction: dict[str, Any] = {"n_train": len(x_tr), "models": {}, "baselines": {}}
        fitted = {}
        for name, cls in (("mlp", MLPRegressor), ("trees", TreesRegressor)):
            t = time.perf_counter()
            fitted[name] = cls.fit(x_tr, y_tr, seed=seed)
            direction["models"][name] = {"fit_s": time.perf_counter() - t}
            if progress:
                print(f"{kind}: fitted {name} on {len(x_tr)} rows in {time.perf_counter() - t:.1f} s")
        for split in held_out:
            x_v, g_v, sel = table(rows, kind, (split,), score_weight)
            if not len(x_v):
                continue
            for name, model in fitted.items():
                pred = np.concatenate([model.predict(x_v), np.zeros((len(x_v), 1))], axis=1)
                chosen = np.array([choose_strength(p, eps=eps, grid=grid) for p in pred])
                direction["models"][name][split] = {
                    "n": len(x_v),
                    "curve_mae": float(np.mean(np.abs(pred[:, :-1] - g_v[:, :-1]))),
                    **evaluate_choices(chosen, g_v, grid, eps, steps),
                }
            base: dict[str, Any] = {}
            for s in FIXED:
                base[f"fixed-{s:g}"] = evaluate_choices(np.full(len(g_v), s), g_v, grid, eps, steps)
            mean_curve = np.append(y_tr.mean(0), 0.0)  # no features: the train set's mean curve
            base["train-mean-curve"] = {
                "curve_mae": float(np.mean(np.abs(mean_curve[None, :-1] - g_v[:, :-1]))),
                **evaluate_choices(
                    np.full(len(g_v), choose_strength(mean_curve, eps=eps, grid=grid)), g_v, grid, eps, steps
                ),
            }
            base["oracle"] = evaluate_choices(np.array([label(g, eps, grid) for g in g_v]), g_v, grid, eps, steps)
            if kind == "edge" and feature_names and "sentence_cos" in feature_names.get("edge", []):
                base["similarity-rule"] = evaluate_choices(
                    _similarity_choices(sel, feature_names["edge"]), g_v, grid, eps, steps
                )
                _, g_t, sel_t = table(rows, kind, ("train",), score_weight)
                fitted_rule = fit_similarity_rule(sel_t, g_t, feature_names["edge"], eps, grid)
                name = f"similarity-rule-low{fitted_rule.low:.2f}-min{fitted_rule.min_strength:.1f} (fit on train)"
                base[name] = evaluate_choices(
                    _similarity_choices(sel, feature_names["edge"], fitted_rule), g_v, grid, eps, steps
                )
            direction["baselines"][split] = base
        select_on = "validation" if "validation" in held_out else (held_out[0] if held_out else None)
        if select_on is not None and select_on in direction["models"]["mlp"]:
            m = direction["models"]
            best = min(("mlp", "trees"), key=lambda k: (m[k][select_on]["label_mae"], m[k][select_on]["curve_mae"]))
        else:
            best = "trees"
        direction["selected"], direction["selected_on"] = best, select_on
        model = fitted[best]
        if refit_all and held_out:
            x_all, g_all, _ = table(rows, kind, ("train", "validation"), score_weight)
            model = type(model).fit(x_all, g_all[:, :-1], seed=seed)
            direction["shipped_n_train"] = len(x_all)
        else:
            direction["shipped_n_train"] = len(x_tr)
        suffix = ".json" if best == "trees" else ".safetensors"
        path = model.save(out / f"{kind}{suffix}", {"direction": kind, "grid": grid})
        stale = out / f"{kind}{'.safetensors' if suffix == '.json' else '.json'}"
        stale.unlink(missing_ok=True)  # the other model kind's file from an earlier run
        manifest[kind] = {"file": path.name, "kind": best, "n_train": direction["shipped_n_train"]}
        direction["predict_ms"] = {name: _predict_ms(m, x_tr[0]) for name, m in fitted.items()}
        direction["predict_ms"]["shipped"] = _predict_ms(load_regressor(path), x_tr[0])
        report["directions"][kind] = direction
    report["directions"] = {k: report["directions"][k] for k in ("edge", "cloud")}  # kept ones came first
    manifest["report"] = {
        k: {"selected": v["selected"], "models": v["models"]} for k, v in report["directions"].items()
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    (out / "train_report.md").write_text(report_markdown(report))
    return report


def _predict_ms(model, x: np.ndarray, repeats: int = 300) -> float:
    """Median milliseconds of one prediction on one ready feature vector (CPU, numpy)."""
    model.predict(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Predictor training (eps {report['eps']}, held out: {', '.join(report['held_out']) or 'none'})", ""]
    for kind, d in report["directions"].items():
        lines += [
            f"## {kind} ({d['n_train']} train rows; shipped: {d['selected']}, fit on {d['shipped_n_train']} rows)",
            "",
            "| split | method | curve MAE | strength MAE vs oracle | gap at choice | within eps | "
            "mean strength | steps saved |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for split in report["held_out"]:
            entries = [(k, v.get(split)) for k, v in d["models"].items()]
            entries += list(d["baselines"].get(split, {}).items())
            for name, v in entries:
                if not v:
                    continue
                cm = f"{v['curve_mae']:.4f}" if "curve_mae" in v else ""
                lines.append(
                    f"| {split} | {name} | {cm} | {v['label_mae']:.3f} | {v['gap']:+.4f} | "
                    f"{v['within_eps']:.2f} | {v['strength']:.2f} | {v['steps_saved']:.0%} |"
                )
        ms = d.get("predict_ms", {})
        lines += [
            "",
            "Prediction time (median, one feature vector, CPU): " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()),
            "",
        ]
    return "\n".join(lines)

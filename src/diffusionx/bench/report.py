"""The benchmark's human outputs: the paper-form table (Markdown) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _rel(value: float | None, base: float | None) -> str:
    return f"{(value / base - 1) * 100:+.1f}%" if base and value is not None else "n/a"


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    methods = report["methods"]
    cloud = methods.get("cloud-only", {}).get("session_latency_mean_s")
    edge = methods.get("edge-only", {}).get("session_latency_mean_s")
    profile, workload = report["profile"], report["workload"]
    lines = [
        "# DiffusionX benchmark",
        "",
        f"Workload: {workload['n_sessions']} sessions ({workload['source']}), "
        f"{workload['rounds_mean']:.2f} rounds on average, {workload['steps']} steps, "
        f"guidance {workload['guidance_scale']}. Models: edge {report['models']['edge']['source']} "
        f"[{report['models']['edge']['status']}], cloud {report['models']['cloud']['source']} "
        f"[{report['models']['cloud']['status']}].",
        "",
        f"Device profile **{profile['name']}**: cloud GPU = this machine x {profile['cloud_speedup']:g}, "
        f"edge = cloud / {profile['edge_slowdown']:g}, RTT {profile['rtt_s'] * 1000:g} ms. "
        f"Source: {profile['source']}.",
        "",
        "| method | session latency mean (s) | p95 (s) | vs cloud-only | vs edge-only | cloud U-Net s/session "
        "| bytes/session | CLIP score | FID | attribute acc. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lat = m["session_latency_mean_s"]
        lines.append(
            f"| {name} | {lat:.3f} | {m['session_latency_p95_s']:.3f} | {_rel(lat, cloud)} | {_rel(lat, edge)} "
            f"| {m['cloud_unet_seconds_per_session']:.3f} | {m['bytes_per_session']:.0f} | {_fmt(m['clip_score'], 2)} "
            f"| {_fmt(m['fid'], 2)} | {_fmt(m['attribute_accuracy'])} |"
        )
    if any(m.get("quality_note") for m in methods.values()):
        lines += ["", "Quality columns: n/a (random weights): this table's models only give latency and cost."]
    lines += _vs_cloud_only_table(methods)
    lines += _edge_preview_table(methods)
    lines += _fidelity_table(methods)
    calib = report["calibration_measured_s"]
    timed = calib.get("models", report["models"])
    lines += [
        "",
        f"## Measured on {calib.get('machine', 'this machine')} (batch 1, CFG)",
        "",
        f"Compute times of edge {timed['edge']['source']} [{timed['edge']['status']}] and cloud "
        f"{timed['cloud']['source']} [{timed['cloud']['status']}] (the latency model uses these; "
        "quality comes from the models above).",
        "",
        "| model | U-Net step (s) | text encode (s) | VAE decode (s) | preview decode (s) | timing noise (U-Net step "
        "IQR / median) |",
        "|---|---|---|---|---|---|",
    ]
    for role in ("edge", "cloud"):
        c = calib[role]
        noise = calib.get("noise", {}).get(role, {}).get("unet_step_s")
        preview = f"{c['preview_decode_s']:.4f}" if "preview_decode_s" in c else "n/a"
        lines.append(f"| {role} | {c['unet_step_s']:.4f} | {c['text_encode_s']:.4f} | {c['decode_s']:.4f} | "
                     f"{preview} | {'n/a (from a file)' if noise is None else f'{noise:.0%}'} |")
    if "preview_decode_s" in calib["edge"]:
        lines += ["", "Previews of rounds before the final (DiffusionX and edge-only) are decoded by the edge's tiny "
                      "preview decoder; every final by the VAE."]
    if "repeats" in calib:
        lines += ["", f"Timed interleaved (edge, cloud, edge, ...), {calib['repeats']} repeats; each time is the "
                      "fastest repeat (other work only adds time). A noise above ~20% means the machine was busy: "
                      "compare methods within one run, or pass `--calibration FILE`."]
    lines += ["", "## Measured vs modelled", ""]
    for kind, items in report["measured_vs_modelled"].items():
        lines.append(f"**{kind}**")
        lines += [f"- {item}" for item in items]
        lines.append("")
    lines += [
        "Raw (measured-profile) seconds: rerun with `--profile measured`.",
        "",
        "Plots: `latency_quality.png`, `quality_fidelity_latency.png`, `per_round_latency.png`, `finals_grid.png`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def _with_ci(mean: float | None, ci: list[float] | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _share(r: dict[str, Any] | None) -> str:
    return f"{r['ratio']:.1%} | [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]" if r else "n/a | n/a"


def _vs_cloud_only_table(methods: dict[str, Any]) -> list[str]:
    """Final attribute accuracy (and CLIP score) as a share of cloud-only's, with the interval the
    sessions allow."""
    rows = [(name, m["attribute_accuracy_vs_cloud_only"], m.get("clip_score_vs_cloud_only"))
            for name, m in methods.items() if m.get("attribute_accuracy_vs_cloud_only")]
    if not rows:
        return []
    lines = ["", "## Final attribute accuracy vs cloud-only (paired over sessions, 95% bootstrap interval)", "",
             "| method | share of cloud-only | 95% interval | sessions | CLIP score share | 95% interval |",
             "|---|---|---|---|---|---|"]
    for name, attributes, clip in rows:
        lines.append(f"| {name} | {_share(attributes)} | {attributes['n']} | {_share(clip)} |")
    return lines


def _fidelity_table(methods: dict[str, Any]) -> list[str]:
    """Is the final still the image the user approved? (methods that refine a preview)"""
    rows = [(name, m["preview_fidelity"]) for name, m in methods.items() if m.get("preview_fidelity")]
    if not rows:
        return []
    lines = [
        "",
        "## Preview fidelity: last preview vs final (means, 95% intervals)",
        "",
        "| method | cloud strength (mean) | PSNR dB | SSIM | evaluator feature distance | attributes kept |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        strength = methods[name].get("cloud_strength", methods[name].get("cloud_strength_mean"))
        lines.append(
            f"| {name} | {_fmt(strength, 2)} | {_with_ci(f['psnr_db'], f['psnr_db_ci95'], 1)} | "
            f"{_with_ci(f['ssim'], f['ssim_ci95'], 3)} | "
            f"{_with_ci(f.get('feature_distance'), f.get('feature_distance_ci95'), 3)} | "
            f"{_with_ci(f.get('attributes_kept'), f.get('attributes_kept_ci95'), 3)} |"
        )
    lines += ["", "Attributes kept: of the named attributes the last preview rendered right, the share the final "
                  "still renders right."]
    return lines


def _from_scratch(methods: dict[str, Any]) -> dict[str, Any] | None:
    """The method whose edge regenerates every round from noise (edge strength 1 or no reuse)."""
    for m in methods.values():
        if m.get("edited_previews") and (m.get("edge_strength") == 1.0 or m.get("reuse_latents") is False):
            return m
    return None


def paired_relative_ci(
    method: dict[str, Any], reference: dict[str, Any], key: str, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% bootstrap interval of mean(method) / mean(reference) - 1 over the previews both have,
    resampling whole sessions (a session's rounds are not independent); None when the two runs
    did not score the same (session, round) previews."""
    a_run, b_run = method.get("edited_preview_per_image"), reference.get("edited_preview_per_image")
    if not a_run or not b_run or (a_run["session"], a_run["round"]) != (b_run["session"], b_run["round"]):
        return None
    sums: dict[int, list[float]] = {}
    for session, a, b in zip(a_run["session"], a_run[key], b_run[key]):
        if a is not None and b is not None:
            total = sums.setdefault(session, [0.0, 0.0])
            total[0] += a
            total[1] += b
    if len(sums) < 2:
        return None
    per_session = np.asarray(list(sums.values()))
    rng = np.random.default_rng(seed)
    draws = per_session[rng.integers(0, len(per_session), size=(n_boot, len(per_session)))].sum(axis=1)
    ratios = draws[:, 0] / np.maximum(draws[:, 1], 1e-12) - 1
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _vs(m: dict[str, Any], ref: dict[str, Any] | None, mean_key: str, per_image_key: str) -> str:
    if ref is None:
        return "n/a"
    text = _rel(m[mean_key], ref[mean_key])
    ci = paired_relative_ci(m, ref, per_image_key) if m is not ref else None
    return f"{text} [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]" if ci else text


def _edge_preview_table(methods: dict[str, Any]) -> list[str]:
    """Rounds 2+ on the edge: the steps a policy saves and what its previews lose for it."""
    rows = {name: m for name, m in methods.items() if m.get("edited_previews")}
    if not rows:
        return []
    ref = _from_scratch(methods)
    lines = [
        "",
        "## Edge previews, rounds 2+",
        "",
        "Edge U-Net steps per session (all rounds) and the quality of the previews of rounds 2+ (where "
        "the edge strength is chosen)" + (", relative to regenerating every round from scratch (edge strength 1); "
                                          "in brackets a 95% interval, pairing each preview with the scratch one and "
                                          "resampling sessions."
                                          if ref else "; add `--policy fixed-1-C` for the from-scratch reference."),
        "",
        "| method | edge U-Net steps/session | vs scratch | preview attribute acc. | vs scratch "
        "| preview CLIP score | vs scratch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        steps, attr, score = m["edge_unet_steps_per_session"], m["edited_preview_attribute_accuracy"], \
            m["edited_preview_clip_score"]
        saved = _rel(steps, ref["edge_unet_steps_per_session"]) if ref else "n/a"
        lines.append(
            f"| {name} | {steps:.1f} | {saved} | {_fmt(attr)} | "
            f"{_vs(m, ref, 'edited_preview_attribute_accuracy', 'attribute_accuracy')} | {score:.2f} | "
            f"{_vs(m, ref, 'edited_preview_clip_score', 'clip_score')} |"
        )
    return lines


def label_offsets(anchors: list[tuple[float, float]], widths: list[float], height: float = 10.0) -> list[float]:
    """Downward pixel shifts so that no two labels overlap: label i starts at anchor i (its
    point, in pixels, y up) and is widths[i] x height; each tries 0, one line down, one line up,
    two down, two up, ... and takes the first place clear of the labels placed before it."""
    placed: list[tuple[float, float, float]] = []
    shifts = []
    for (x, y), w in zip(anchors, widths):
        for k in range(2 * len(anchors) + 1):
            shift = height * ((k + 1) // 2) * (1 if k % 2 else -1)
            if not any(x < bx + bw and bx < x + w and abs((y - shift) - by) < height for bx, by, bw in placed):
                break
        placed.append((x, y - shift, w))
        shifts.append(shift + 0.0)
    return shifts


def _place_labels(ax, points: list[tuple[str, float, float]], dpi: int) -> None:
    """Name each point; a label that would run into another moves a line or more away, with a
    thin line back to its point."""
    font_pt = 8
    px = dpi / 72.0
    anchors = [tuple(ax.transData.transform((x, y)) + 4 * px) for _, x, y in points]
    widths = [0.6 * font_pt * px * len(name) for name, _, _ in points]  # ~0.6 em per character
    shifts = label_offsets(anchors, widths, height=1.25 * font_pt * px)
    for (name, x, y), shift in zip(points, shifts):
        arrow = {"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if shift else None
        ax.annotate(name, (x, y), fontsize=font_pt, xytext=(4, 4 - shift / px), textcoords="offset points",
                    arrowprops=arrow)


def write_plots(report: dict[str, Any], finals: dict[str, list], prompts: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    dpi = 110
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=dpi)
    for ax, key in zip(axes, ("attribute_accuracy", "fid")):
        points = [(name.removeprefix("diffusionx-"), m["session_latency_mean_s"], m[key])
                  for name, m in methods.items() if m.get(key) is not None]
        if not points:
            continue
        for _, x, y in points:
            ax.scatter(x, y, s=40)
        ax.autoscale_view()
        _place_labels(ax, points, dpi)
    axes[0].set_ylabel("final attribute accuracy (higher is better)")
    axes[1].set_ylabel("final FID (lower is better)")
    for ax in axes:
        ax.set_xlabel(f"mean session latency (s), profile {report['profile']['name']}")
        ax.grid(alpha=0.3)
    fig.suptitle("Latency vs quality, one point per method (DiffusionX methods without the diffusionx- prefix)")
    fig.tight_layout()
    fig.savefig(out / "latency_quality.png", dpi=dpi)
    plt.close(fig)

    fidelity = [(name.removeprefix("diffusionx-"), m) for name, m in methods.items()
                 if m.get("preview_fidelity") and m.get("attribute_accuracy") is not None]
    if fidelity:
        fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=dpi)
        xs = [m["preview_fidelity"]["psnr_db"] for _, m in fidelity]
        ys = [m["attribute_accuracy"] for _, m in fidelity]
        lat = [m["session_latency_mean_s"] for _, m in fidelity]
        dots = ax.scatter(xs, ys, c=lat, cmap="viridis", s=60)
        fig.colorbar(dots, ax=ax, label=f"mean session latency (s), profile {report['profile']['name']}")
        _place_labels(ax, [(name, x, y) for (name, _), x, y in zip(fidelity, xs, ys)], dpi)
        cloud_only = methods.get("cloud-only", {}).get("attribute_accuracy")
        if cloud_only is not None:
            ax.axhline(cloud_only, color="gray", ls="--", lw=1, label="cloud-only")
            ax.legend(fontsize=8)
        ax.set_xlabel("preview fidelity: PSNR(last preview, final) dB (higher keeps more of the preview)")
        ax.set_ylabel("final attribute accuracy")
        ax.grid(alpha=0.3)
        ax.set_title("Quality vs fidelity vs latency")
        fig.tight_layout()
        fig.savefig(out / "quality_fidelity_latency.png", dpi=dpi)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, m in methods.items():
        waits = list(m["round_wait_mean_s"])
        xs = list(range(1, len(waits) + 1))
        if m["kind"] == "diffusionx":
            waits.append(m["final_wait_mean_s"])
            xs.append(len(xs) + 1)
        ax.plot(xs, waits, marker="o", label=name)
    ax.set_xlabel("round (the last point of a DiffusionX line is the finalize wait)")
    ax.set_ylabel("mean user wait (s)")
    ax.set_title("Per-round user wait")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "per_round_latency.png", dpi=110)
    plt.close(fig)

    finals_grid(finals, prompts, out / "finals_grid.png")


def finals_grid(finals: dict[str, list], prompts: list[str], path: Path, columns: int = 8, cell: int = 128) -> None:
    """Rows: methods; columns: the first sessions' final images; prompts as column captions."""
    import textwrap

    from PIL import Image, ImageDraw

    names = list(finals)
    columns = min(columns, len(prompts))
    label_w, caption_h = 170, 70
    grid = Image.new("RGB", (label_w + columns * cell, caption_h + len(names) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(columns):
        text = "\n".join(textwrap.wrap(prompts[c], 22)[:5])
        draw.text((label_w + c * cell + 3, 2), text, fill="black")
    for r, name in enumerate(names):
        draw.text((4, caption_h + r * cell + cell // 2 - 6), name, fill="black")
        for c in range(columns):
            image = finals[name][c].resize((cell, cell), Image.NEAREST)
            grid.paste(image, (label_w + c * cell, caption_h + r * cell))
    grid.save(path)

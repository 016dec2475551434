"""Load test of the refinement service: continuous batching vs one request at a time (numbers,
not a test). The servers, clients and wire sizes: diffusionx.server.loadtest.

    python benchmarks/loadtest.py [--model untrained] [--clients 1 4 8 16] [--per-client 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from diffusionx.server.capacity import bound, scaling_table, share_of_bound, step_time_at, steps_per_refinement
from diffusionx.server.loadtest import STRENGTHS, counters, drive, served, wire_sizes


class BoundMeter:
    """t(b) of the served cloud U-Net in this process, at the server's thread count, measured while
    the server is idle: before and after every load phase, so that the bound a phase is held to was
    measured within a minute of it (this machine's step time drifts by tens of percent over
    minutes), and pooled (the median of both) to damp a single noisy measurement."""

    def __init__(self, args):
        import torch

        from diffusionx.models import load_pair

        if args.threads:
            torch.set_num_threads(args.threads)
        self.engine = load_pair(args.model).cloud
        self.latent = tuple(self.engine.latent_shape()[1:])
        self.text = tuple(self.engine.encode_prompt("a circle", guidance=False).cond.shape[1:])
        self.k = steps_per_refinement(STRENGTHS, args.steps)
        self.batches = sorted({1, *[min(c, args.max_batch) for c in args.clients], args.max_batch})

    def measure(self) -> list[dict]:
        return scaling_table(self.engine.unet, self.batches, latent_shape=self.latent, text_shape=self.text, k=self.k,
                             repeats=5)

    def pooled(self, *tables: list[dict]) -> list[dict]:
        """One table from several measurements: each t(b) the median of all their samples."""
        rows = []
        for b in self.batches:
            samples = [t for table in tables for row in table if row["batch"] == b for t in row["step_s_all"]]
            step = statistics.median(samples)
            rows.append({"batch": b, "step_s": step, "step_s_all": samples, "bound_per_s": bound(b, step, self.k),
                         "spread": (max(samples) - min(samples)) / step})
        return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--per-client", type=int, default=2, help="refinements each client sends")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-batch", type=int, default=8, help="8 is the sweet spot of the embedded model on a CPU")
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    p.add_argument("--switch-interval", type=float, default=0.0, metavar="MS",
                   help="the server's GIL switch interval in milliseconds (0: Python's 5 ms)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    meter = BoundMeter(args)
    tables: list[list[dict]] = []
    results: dict[tuple[str, int], dict] = {}
    for mode, max_batch in (("continuous", args.max_batch), ("one-at-a-time", 1)):
        with served(args.model, max_batch, args.threads, args.switch_interval) as (url, shape, model):
            print(f"{mode}: cloud model {model}, max batch {max_batch}", file=sys.stderr)
            drive(url, shape, 1, 1, args.steps, args.guidance)  # warm-up
            for n in args.clients:
                bound_before = meter.measure()
                before = counters(url)
                r = drive(url, shape, n, args.per_client, args.steps, args.guidance)
                after = counters(url)
                bound_after = meter.measure()
                tables += [bound_before, bound_after]
                phase_bound = meter.pooled(bound_before, bound_after)
                calls = after.get("diffusionx_unet_calls_total", 0) - before.get("diffusionx_unet_calls_total", 0)
                # mean requests per U-Net call = request-steps run / calls; the bound for this run's own
                # step mix (a few requests do not cover the whole strength mix)
                k = r["unet_steps"] / r["n"]
                r["mean_batch"] = r["unet_steps"] / calls if calls else None
                bound_at, _ = share_of_bound(r["throughput"], r["mean_batch"] or 1, phase_bound)
                bound_at *= meter.k / k
                r["bound_per_s"], r["share_of_bound"], r["k"] = bound_at, r["throughput"] / bound_at, k
                # Where the rest went: the share is (U-Net busy share of the wall) x (t(b) alone / the
                # step time under this load); a low first factor is idle or other work on the step
                # loop, a low second one is the U-Net slowed by whatever else the machine ran.
                seconds = after.get("diffusionx_unet_seconds_total", 0) - before.get("diffusionx_unet_seconds_total", 0)
                r["unet_busy_share"] = seconds / r["wall_s"]
                r["step_s_under_load"] = seconds / calls if calls else None
                r["step_s_alone"] = step_time_at(r["mean_batch"] or 1, phase_bound)
                r["bound_rows"] = phase_bound
                results[(mode, n)] = r
                slowdown = (r["step_s_under_load"] / r["step_s_alone"] - 1) if r["step_s_under_load"] else float("nan")
                print(
                    f"{mode:>14} {n:>3} clients: {r['throughput']:.2f}/s = {r['share_of_bound']:.0%} of the bound "
                    f"({bound_at:.2f}/s at mean batch {r['mean_batch'] or 0:.1f}), "
                    f"p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, p99 {r['p99']:.2f} s; U-Net busy "
                    f"{r['unet_busy_share']:.0%} of the wall, a step {(r['step_s_under_load'] or 0) * 1000:.1f} ms "
                    f"under load vs {r['step_s_alone'] * 1000:.1f} ms alone ({slowdown:+.0%})",
                    file=sys.stderr,
                )
    print(
        f"\nrefinements at strengths {STRENGTHS}, {args.steps} steps, guidance {args.guidance}, "
        f"{args.per_client} per client; max batch {args.max_batch}"
    )
    overall = meter.pooled(*tables)
    print(f"bound b / (k t(b)), k = {meter.k:g}, t(b) measured idle before and after every phase (median; "
          f"min-max): " + ", ".join(
              f"b={row['batch']}: {row['bound_per_s']:.2f}/s (t {row['step_s'] * 1000:.1f} ms, "
              f"{min(row['step_s_all']) * 1000:.1f}-{max(row['step_s_all']) * 1000:.1f})" for row in overall))
    print(
        f"{'clients':>7} | {'continuous r/s':>14} {'of bound':>8} {'batch':>5} {'p50 s':>6} {'p95 s':>6} "
        f"{'p99 s':>6} | {'1-at-a-time r/s':>15} {'p95 s':>6} | speed-up"
    )
    for n in args.clients:
        a, b = results[("continuous", n)], results[("one-at-a-time", n)]
        print(
            f"{n:>7} | {a['throughput']:>14.2f} {a['share_of_bound']:>8.0%} {a['mean_batch'] or 0:>5.1f} "
            f"{a['p50']:>6.2f} {a['p95']:>6.2f} {a['p99']:>6.2f} | {b['throughput']:>15.2f} {b['p95']:>6.2f} | "
            f"{a['throughput'] / b['throughput']:.2f}x"
        )
    if args.json:
        import json

        rows = [{"mode": mode, "clients": n, **r} for (mode, n), r in results.items()]
        with open(args.json, "w") as f:
            json.dump({"bound": {"k": meter.k, "rows": overall}, "runs": rows}, f, indent=2)
    print(f"\n{'hand-off':<18} {'latent fp16 B':>13} {'as JSON B':>10} {'PNG B':>8} {'as JSON B':>10}")
    for label, latent, latent_json, png, png_json in wire_sizes():
        print(f"{label:<18} {latent:>13} {latent_json:>10} {png:>8} {png_json:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

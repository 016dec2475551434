"""Load test of the refinement service: continuous batching vs one request at a time (numbers,
not a test). The servers, clients and wire sizes: diffusionx.server.loadtest.

    python benchmarks/loadtest.py [--model untrained] [--clients 1 4 8 16] [--per-client 2]
"""

from __future__ import annotations

import argparse
import sys

from diffusionx.server.loadtest import STRENGTHS, drive, served, wire_sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--per-client", type=int, default=2, help="refinements each client sends")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-batch", type=int, default=8, help="8 is the sweet spot of the embedded model on a CPU")
    p.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    args = p.parse_args(argv)
    results: dict[tuple[str, int], dict] = {}
    for mode, max_batch in (("continuous", args.max_batch), ("one-at-a-time", 1)):
        with served(args.model, max_batch, args.threads) as (url, shape, model):
            print(f"{mode}: cloud model {model}, max batch {max_batch}", file=sys.stderr)
            drive(url, shape, 1, 1, args.steps, args.guidance)  # warm-up
            for n in args.clients:
                r = drive(url, shape, n, args.per_client, args.steps, args.guidance)
                results[(mode, n)] = r
                print(
                    f"{mode:>14} {n:>3} clients: {r['throughput']:.2f} refinements/s, "
                    f"p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s",
                    file=sys.stderr,
                )
    print(
        f"\nrefinements at strengths {STRENGTHS}, {args.steps} steps, guidance {args.guidance}, "
        f"{args.per_client} per client; max batch {args.max_batch}"
    )
    print(
        f"{'clients':>7} | {'continuous r/s':>14} {'p50 s':>7} {'p95 s':>7} | {'1-at-a-time r/s':>15} "
        f"{'p50 s':>7} {'p95 s':>7} | speed-up"
    )
    for n in args.clients:
        a, b = results[("continuous", n)], results[("one-at-a-time", n)]
        print(
            f"{n:>7} | {a['throughput']:>14.2f} {a['p50']:>7.2f} {a['p95']:>7.2f} | {b['throughput']:>15.2f} "
            f"{b['p50']:>7.2f} {b['p95']:>7.2f} | {a['throughput'] / b['throughput']:.2f}x"
        )
    print(f"\n{'hand-off':<18} {'latent fp16 B':>13} {'as JSON B':>10} {'PNG B':>8} {'as JSON B':>10}")
    for label, latent, latent_json, png, png_json in wire_sizes():
        print(f"{label:<18} {latent:>13} {latent_json:>10} {png:>8} {png_json:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

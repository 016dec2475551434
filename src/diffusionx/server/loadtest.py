"""Load test of the refinement service: continuous batching vs one request at a time.

    python -m diffusionx.server.loadtest [--model untrained] [--clients 1 4 8 16] [--per-client 2]

Starts two loopback servers (`diffusionx serve` subprocesses) on the same cloud model: max batch
8, and max batch 1 (one request at a time). Drives each with N concurrent clients sending
refinements at mixed strengths and prints throughput (refinements/s) and p50/p95 latency; then
the bytes a latent and a PNG hand-off put on the wire at 64x64 (embedded) and 512x512 (SD v1.5
shapes). Numbers, not a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image

from ..wire import image_to_png, latents_to_bytes

STRENGTHS = (0.3, 0.5, 0.7, 0.9)
PROMPTS = (
    "a large red circle on the left on a blue background",
    "a small yellow star at the top right on a white background",
    "a green heart in the center and a purple ring at the bottom on a black background",
)


def drive(url: str, shape: tuple[int, ...], clients: int, per_client: int, steps: int, guidance: float) -> dict:

    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(per_client):
                k = c * per_client + i
                latents = torch.randn(shape, generator=torch.Generator().manual_seed(k))
                body = {
                    "prompt": PROMPTS[k % len(PROMPTS)],
                    "strength": STRENGTHS[k % len(STRENGTHS)],
                    "steps": steps,
                    "seed": k,
                    "guidance": guidance,
                    "latent": base64.b64encode(latents_to_bytes(latents)).decode(),
                }
                start = time.perf_counter()
                response = http.post("/v1/refine", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - start
    q = np.percentile(latencies, [50, 95])
    return {"throughput": len(latencies) / wall, "p50": float(q[0]), "p95": float(q[1]), "n": len(latencies)}


def wire_sizes() -> list[tuple[str, int, int, int, int]]:
    """(label, latent bytes, latent JSON bytes, PNG bytes, PNG JSON bytes) at 64 and 512 pixels."""
    from ..world.scene import random_scene, render

    rows = []
    for label, size, latent_shape in (
        ("64x64 (embedded)", 64, (1, 4, 16, 16)),
        ("512x512 (SD v1.5)", 512, (1, 4, 64, 64)),
    ):
        latent = latents_to_bytes(torch.randn(latent_shape))
        image = Image.fromarray(render(random_scene(np.random.default_rng(0)), size=size))
        png = image_to_png(image)
        b64 = lambda data: len(json.dumps({"latent": base64.b64encode(data).decode()}))  # noqa: E731
        rows.append((label, len(latent), b64(latent), len(png), b64(png)))
    return rows


@contextlib.contextmanager
def served(model: str, max_batch: int, threads: int):
    """`diffusionx serve` in a subprocess on a free loopback port (its own process, as in production,
    so the client threads here do not compete with it for the GIL); stopped with SIGTERM."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "diffusionx.cli", "serve", "--model", model, "--insecure"]
    command += ["--port", str(port), "--max-batch", str(max_batch), "--max-concurrent", "100000", "--rate", "1e9"]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(url + "/v1/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {' '.join(command)}")
            time.sleep(0.5)
        yield url, tuple(health.json()["latent_shape"]), health.json()["model"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


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

"""Load test of the refinement service: continuous batching vs one request at a time.

    python benchmarks/loadtest.py [--model untrained] [--clients 1 4 8 16] [--per-client 2]

Starts two loopback servers (`diffusionx serve` subprocesses) on the same cloud model: max batch
8, and max batch 1 (one request at a time). Drives each with N concurrent clients sending
refinements at mixed strengths and prints throughput (refinements/s) and p50/p95 latency; then
the bytes a latent and a PNG hand-off put on the wire at 64x64 (embedded) and 512x512 (SD v1.5
shapes). Numbers, not a test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
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
    q = np.percentile(latencies, [50, 95, 99])
    sent = [STRENGTHS[k % len(STRENGTHS)] for k in range(clients * per_client)]
    unet_steps = sum(max(1, math.ceil(s * steps - 1e-9)) for s in sent)
    return {"throughput": len(latencies) / wall, "unet_steps": unet_steps, "p50": float(q[0]), "p95": float(q[1]),
            "p99": float(q[2]), "n": len(latencies), "wall_s": wall}


def counters(url: str) -> dict[str, float]:
    """The service's /metrics counters and gauges without labels, by name."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return values


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
def served(model: str, max_batch: int, threads: int, switch_interval_ms: float = 0.0):
    """`diffusionx serve` in a subprocess on a free loopback port (its own process, as in production,
    so the client threads here do not compete with it for the GIL); stopped with SIGTERM."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "diffusionx.cli", "serve", "--model", model, "--insecure"]
    command += ["--port", str(port), "--max-batch", str(max_batch), "--max-concurrent", "100000", "--rate", "1e9"]
    if threads:
        command += ["--threads", str(threads)]
    if switch_interval_ms:
        command += ["--switch-interval", str(switch_interval_ms)]
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

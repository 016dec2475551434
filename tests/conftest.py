import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(1)  # the suite runs beside other work on 2 cores; spinning threads would fight

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def untrained_pair():
    """The embedded architecture with random weights: fast, and enough for exactness tests."""
    from diffusionx.models import load_pair

    return load_pair("untrained")


@pytest.fixture(scope="session")
def embedded_pair():
    from diffusionx.models import EMBEDDED_DIR, load_pair

    if not (EMBEDDED_DIR / "pair.json").exists():
        pytest.skip("the trained embedded pair is not in this checkout")
    return load_pair("embedded")


@pytest.fixture(scope="session")
def real_prompts():
    path = SHARED_DATA / "diffusiondb_prompts_first5k.txt"
    if not path.exists():
        pytest.skip(f"{path} not found (shared/ lies beside the repository)")
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class UNetCallCounter:
    """Counts U-Net forward calls and the batch size of each."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])

    def close(self):
        self._handle.remove()


@pytest.fixture
def count_unet_calls():
    counters = []

    def attach(unet):
        counter = UNetCallCounter(unet)
        counters.append(counter)
        return counter

    yield attach
    for counter in counters:
        counter.close()


class LocalServe:
    """A local Ray instance with Serve's HTTP proxy on a free loopback port (`ray_serve`)."""

    def __init__(self, ray, serve, port: int):
        self.ray, self.serve, self.port = ray, serve, port
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ray_serve():
    """One local Ray + Serve for a test module: loopback only, 2 CPUs, a small object store, shut
    down when the module ends so nothing outlives it. Each test deploys its own app with
    `serve.run`."""
    import socket

    from diffusionx.server.ray_serve import ray_environment

    ray_environment()  # before ray is imported: loopback traffic, no auth token under ~/.ray
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield LocalServe(ray, serve, port)
    finally:
        serve.shutdown()
        ray.shutdown()

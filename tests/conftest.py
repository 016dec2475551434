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

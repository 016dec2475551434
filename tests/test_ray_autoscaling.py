"""Ray Serve autoscaling on this CPU: load adds a replica, idleness removes it."""

from __future__ import annotations

import base64
import contextlib
import threading
import time

import httpx
import pytest
import torch

from diffusionx.server.config import Limits
from diffusionx.server.ray_serve import APP_NAME, DEPLOYMENT_NAME, build_app
from diffusionx.wire import latents_to_bytes

pytestmark = pytest.mark.slow


def _running_replicas(serve) -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return status.replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_load_adds_a_replica_and_idleness_removes_it(untrained_pair, ray_serve):
    serve, url = ray_serve.serve, ray_serve.url
    stop = threading.Event()
    try:
        app = build_app(model="untrained", insecure=True, max_batch=1, limits=Limits(max_concurrent_per_token=64),
                        replicas=1, max_replicas=2, threads=1,
                        scaling_delays={"upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "look_back_period_s": 2.0})
        serve.run(app, name=APP_NAME, route_prefix="/")
        assert _running_replicas(serve) == 1
        latent = base64.b64encode(latents_to_bytes(torch.randn(untrained_pair.cloud.latent_shape()))).decode()

        def client(i: int) -> None:  # long refinements, back to back: several in flight per replica
            k = 0
            while not stop.is_set():
                body = {"prompt": "a red circle", "strength": 1.0, "steps": 30, "seed": k, "guidance": 7.5,
                        "latent": latent}
                with contextlib.suppress(httpx.HTTPError):  # a refusal is load too; keep sending
                    httpx.post(url + "/v1/refine", json=body, timeout=120)
                k += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        assert _wait_for(lambda: _running_replicas(serve) == 2, timeout=120), "load did not add a replica"
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert _wait_for(lambda: _running_replicas(serve) == 1, timeout=120), "idleness did not remove the replica"
    finally:
        stop.set()
        serve.delete(APP_NAME)

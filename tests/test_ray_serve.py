"""Ray Serve scale-out: a local Ray instance, 2 replicas of the refiner, concurrent requests."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from diffusionx.server.config import Limits
from diffusionx.server.ray_serve import APP_NAME, build_app
from diffusionx.wire import latents_from_bytes, latents_to_bytes

pytestmark = pytest.mark.slow
TOKEN = "ray-test-token"
PROMPT = "a large blue square at the bottom on a yellow background"


@pytest.fixture(scope="module")
def ray_url(ray_serve, tmp_path_factory):
    limits = Limits(max_concurrent_per_token=16)  # one token sends all 12 at once
    store = str(tmp_path_factory.mktemp("ray-state") / "idempotency.sqlite3")  # both replicas share it
    app = build_app(model="untrained", tokens={TOKEN}, max_batch=4, limits=limits, replicas=2, threads=1, store=store)
    ray_serve.serve.run(app, name=APP_NAME, route_prefix="/")
    yield ray_serve.url
    ray_serve.serve.delete(APP_NAME)


def _latents(engine, n: int) -> list[torch.Tensor]:
    return [torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _send(ray_url: str, latents: list[torch.Tensor], i: int) -> httpx.Response:
    body = {
        "prompt": PROMPT,
        "strength": 0.5,
        "steps": 4,
        "seed": i,
        "guidance": 1.0,
        "latent": base64.b64encode(latents_to_bytes(latents[i], "fp32")).decode(),
    }
    return httpx.post(
        ray_url + "/v1/refine",
        json=body,
        timeout=180,
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": f"req-{i}"},
    )


def test_two_replicas_answer_every_request_once(untrained_pair, ray_url):
    engine = untrained_pair.cloud  # the replicas build the same untrained weights (fixed seeds)
    n = 12
    latents = _latents(engine, n)

    def send(i: int) -> httpx.Response:
        return _send(ray_url, latents, i)

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(send, range(n)))
    assert [r.status_code for r in responses] == [200] * n, [r.text[:200] for r in responses if r.status_code != 200]
    data = [r.json() for r in responses]
    assert len({d["request_id"] for d in data}) == n  # all answered, each its own

    # Each replica numbers the refinements it computed 1, 2, 3...: no gaps and no repeats across the
    # answers means nothing was computed twice and nothing computed went unanswered.
    per_replica: dict[str, list[int]] = {}
    for d in data:
        per_replica.setdefault(d["replica"], []).append(d["seq"])
    for seqs in per_replica.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert sum(len(s) for s in per_replica.values()) == n

    # and each answer is the refinement of its own request
    for i, d in enumerate(data):
        expected = engine.generate(
            PROMPT, seed=i, steps=4, strength=0.5, guidance_scale=1.0, init_latents=latents[i], decode=False
        ).latents
        got = latents_from_bytes(base64.b64decode(d["payload"]))  # fp16, the wire format's default
        torch.testing.assert_close(got, latents_from_bytes(latents_to_bytes(expected)), atol=1e-4, rtol=2**-10)

    health = httpx.get(ray_url + "/v1/health", timeout=30).json()
    assert health["status"] == "ok"
    # Both replicas are up (each reports itself); which ones took the burst is the router's choice.
    replicas = {httpx.get(ray_url + "/v1/load", timeout=30).json()["replica"] for _ in range(20)}
    assert len(replicas) == 2, replicas


def test_retries_at_either_replica_replay_from_the_shared_store(untrained_pair, ray_url):
    """A retry routed to the replica that did not compute it used to be computed again: the
    idempotency cache lived in each replica. They now share one store (here a SQLite file)."""
    engine = untrained_pair.cloud
    latents = _latents(engine, 12)
    first = [_send(ray_url, latents, i).json() for i in range(12)]  # computed above, or now
    completed_before = {}
    for _ in range(20):
        load = httpx.get(ray_url + "/v1/load", timeout=30).json()
        completed_before[load["replica"]] = load["completed"]
    with ThreadPoolExecutor(6) as pool:
        retries = list(pool.map(lambda i: _send(ray_url, latents, i % 12), range(36)))
    assert all(r.status_code == 200 and r.headers.get("idempotent-replay") == "true" for r in retries)
    assert [r.json()["request_id"] for r in retries] == [first[i % 12]["request_id"] for i in range(36)]
    for _ in range(20):
        load = httpx.get(ray_url + "/v1/load", timeout=30).json()
        assert load["completed"] == completed_before.get(load["replica"], load["completed"])

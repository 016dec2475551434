"""The edge's HTTP client against a real loopback server: round trip, errors, retries, fallback."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import torch

from diffusionx.client import CloudClient, CloudError
from diffusionx.cloud import CloudRefiner, RefineRequest
from diffusionx.errors import InvalidInputError
from diffusionx.server.app import Limits, create_app
from diffusionx.server.run import start_in_thread
from diffusionx.session import EdgeSession
from diffusionx.wire import latents_from_bytes, latents_to_bytes

TOKEN = "client-test-token"
PROMPT = "a small yellow star at the top right on a white background"


@pytest.fixture(scope="module")
def server(untrained_pair):
    limits = Limits(max_prompt_chars=100, max_steps=50)
    running = start_in_thread(create_app(untrained_pair.cloud, tokens={TOKEN}, max_batch=4, limits=limits))
    yield running
    running.stop()


def make_request(engine, **kw) -> RefineRequest:
    latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(4))
    return RefineRequest(
        **{
            "prompt": PROMPT,
            "strength": 0.5,
            "steps": 6,
            "seed": 9,
            "guidance_scale": 1.0,
            "latents": latents_to_bytes(latents),
            **kw,
        }
    )


def free_port_url() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_client_round_trip_equals_in_process(untrained_pair, server):
    engine = untrained_pair.cloud
    with CloudClient(server.url, TOKEN) as client:
        result = client.refine(make_request(engine))
        assert client.load()["max_batch"] == 4
        assert client.health()["status"] == "ok"
    expected = CloudRefiner(engine).refine(make_request(engine))
    torch.testing.assert_close(
        latents_from_bytes(result.payload), latents_from_bytes(expected.payload), atol=1e-3, rtol=0
    )
    assert result.unet_steps == 3 and result.timing.unet_calls == 3 and result.cloud_seconds > 0


def test_session_finalizes_over_http(untrained_pair, server):
    with CloudClient(server.url, TOKEN) as client:
        session = EdgeSession(untrained_pair, cloud=client, steps=4, guidance_scale=1.0)
        session.generate(PROMPT)
        final = session.finalize(strength=0.5)
    assert final.refined and final.reason is None and final.unet_steps == 2
    assert final.bytes_down > 0 and final.image.size == session.rounds[0].image.size


def test_validation_error_raises_invalid_input_with_the_server_message(untrained_pair, server):
    with CloudClient(server.url, TOKEN, retries=3) as client:
        with pytest.raises(InvalidInputError, match="at most 100"):
            client.refine(make_request(untrained_pair.cloud, prompt="word " * 30))
        assert client.attempts == 1  # a 4xx is not retried


def test_bad_token_is_a_cloud_error_and_the_session_keeps_the_preview(untrained_pair, server):
    with CloudClient(server.url, "wrong-token-xyz", retries=2) as client:
        with pytest.raises(CloudError, match="403"):
            client.refine(make_request(untrained_pair.cloud))
        assert client.attempts == 1
        session = EdgeSession(untrained_pair, cloud=client, steps=4, guidance_scale=1.0)
        preview = session.generate(PROMPT)
        final = session.finalize(strength=0.5)
    assert not final.refined and "403" in final.reason and final.image is preview.image


def test_cloud_down_keeps_the_preview(untrained_pair):
    url = free_port_url()
    client = CloudClient(url, TOKEN, retries=2, backoff=0.05, connect_timeout=1)
    session = EdgeSession(untrained_pair, cloud=client, steps=4, guidance_scale=1.0)
    preview = session.generate(PROMPT)
    start = time.perf_counter()
    final = session.finalize(strength=0.5)
    assert time.perf_counter() - start < 10
    assert not final.refined and final.image is preview.image
    assert "ConnectError" in final.reason and url in final.reason
    assert client.attempts == 3


def test_retry_after_a_lost_response_is_not_computed_twice(untrained_pair, server):
    """The first attempt times out while the server computes; the retries carry the same
    Idempotency-Key, so they wait for (or replay) that one computation."""
    service = server.server.config.app.state.service
    before, replays = service.refiner.load().completed, service.replays
    engine = untrained_pair.cloud
    request = make_request(engine, strength=1.0, steps=8, guidance_scale=7.5, seed=31)
    # Each U-Net call is held for 0.15 s, so the computation outlasts the 0.4 s timeout on any
    # machine (a fast one used to finish inside the first attempt).
    slow = engine.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.15))
    try:
        with CloudClient(server.url, TOKEN, timeout=0.4, retries=100, backoff=0.1, max_backoff=0.3) as client:
            result = client.refine(request)
            assert client.attempts >= 2
    finally:
        slow.remove()
    assert service.refiner.load().completed == before + 1
    assert service.replays >= replays + 1
    assert result.unet_steps == 8


def test_retries_5xx_and_429_honouring_retry_after():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((time.monotonic(), request.headers["idempotency-key"]))
        if len(calls) == 1:
            return httpx.Response(503, json={"error": {"message": "draining"}}, headers={"Retry-After": "1"})
        if len(calls) == 2:
            return httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "0"})
        return httpx.Response(500, json={"error": {"message": "boom"}})

    client = CloudClient("http://127.0.0.1:9", retries=2, backoff=0.01, transport=httpx.MockTransport(handler))
    request = RefineRequest(prompt="x", strength=0.5, latents=latents_to_bytes(torch.zeros(1, 4, 16, 16)))
    with pytest.raises(CloudError, match=r"3 attempts.*boom"):
        client.refine(request)
    assert len(calls) == 3 and calls[1][0] - calls[0][0] >= 1.0  # waited for Retry-After
    assert len({key for _, key in calls}) == 1  # one key for every attempt

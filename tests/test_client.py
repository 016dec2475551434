"""The edge's HTTP client against a real loopback server: round trip, errors, retries, fallback."""

from __future__ import annotations

import base64
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


# ----- issue 18: Retry-After, deadlines, unusable answers -------------------------------------
def _answer(payload: bytes, return_format: str = "latent") -> dict:
    """A well-formed 200 body around `payload`."""
    return {
        "request_id": "r-1",
        "return_format": return_format,
        "media_type": "application/vnd.diffusionx.latents+safetensors",
        "payload": base64.b64encode(payload).decode(),
        "strength": 0.5,
        "steps": 6,
        "unet_steps": 3,
        "timings": {"queue_s": 0, "text_encode_s": 0, "vae_encode_s": 0, "unet_s": 0, "decode_s": 0, "total_s": 0},
        "cost": {"unet_steps": 3, "unet_calls": 3, "unet_compute_s": 0.0},
        "largest_batch": 1,
        "replica": "mock",
        "seq": 1,
    }


class _VirtualTime:
    """Stands in for the client module's `time`: sleep() records and advances a virtual clock."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def virtual_time(monkeypatch):
    import diffusionx.client as client_module

    clock = _VirtualTime()
    monkeypatch.setattr(client_module, "time", clock)
    return clock


def _mock_client(responses, **kw) -> tuple[CloudClient, list]:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return responses[min(len(calls), len(responses)) - 1]

    return CloudClient("http://127.0.0.1:9", transport=httpx.MockTransport(handler), **kw), calls


def _zeros_request() -> RefineRequest:
    return RefineRequest(prompt="x", strength=0.5, latents=latents_to_bytes(torch.zeros(1, 4, 16, 16)))


def test_a_long_retry_after_is_honoured_in_full(virtual_time):
    """It used to be cut to max_backoff (20 s), so the retry came back before the server was ready."""
    good = httpx.Response(200, json=_answer(latents_to_bytes(torch.zeros(1, 4, 16, 16))))
    busy = httpx.Response(503, json={"error": {"message": "busy"}}, headers={"Retry-After": "45"})
    client, calls = _mock_client([busy, good], retries=2, backoff=0.01, max_backoff=20)
    result = client.refine(_zeros_request())
    assert len(calls) == 2 and result.unet_steps == 3
    assert virtual_time.sleeps and virtual_time.sleeps[0] >= 45


def test_a_retry_after_past_the_deadline_fails_at_once(virtual_time):
    busy = httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "600"})
    client, calls = _mock_client([busy], retries=5, backoff=0.01, deadline=30)
    with pytest.raises(CloudError, match=r"Retry-After: 600 s.*deadline of 30 s.*slow down"):
        client.refine(_zeros_request())
    assert len(calls) == 1 and virtual_time.sleeps == []  # no sleeping towards a certain failure


def test_the_deadline_bounds_every_attempt(virtual_time):
    client, calls = _mock_client([httpx.Response(503, json={"error": {"message": "busy"}})], retries=100, deadline=5)
    with pytest.raises(CloudError, match="deadline"):
        client.refine(_zeros_request())
    assert sum(virtual_time.sleeps) <= 5 and len(calls) < 101


def test_a_non_json_200_is_a_cloud_error():
    page = httpx.Response(200, content=b"<html>a captive portal</html>", headers={"Content-Type": "text/html"})
    client, _ = _mock_client([page], retries=0)
    with pytest.raises(CloudError, match=r"not JSON.*captive portal"):
        client.refine(_zeros_request())
    with pytest.raises(CloudError, match="not JSON"):
        client.load()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_unusable_latents_in_a_200_are_a_cloud_error(value):
    bad = latents_to_bytes(torch.full((1, 4, 16, 16), value), "fp32")
    client, calls = _mock_client([httpx.Response(200, json=_answer(bad))], retries=2)
    with pytest.raises(CloudError, match="unusable latents"):
        client.refine(_zeros_request())
    assert len(calls) == 1  # a 200 is not retried, however bad


def test_a_non_finite_answer_falls_back_to_the_preview(untrained_pair):
    shape = untrained_pair.cloud.latent_shape()
    nan = httpx.Response(200, json=_answer(latents_to_bytes(torch.full(shape, float("nan")))))
    client, _ = _mock_client([nan], retries=0)
    session = EdgeSession(untrained_pair, cloud=client, steps=4, guidance_scale=1.0)
    preview = session.generate(PROMPT)
    final = session.finalize(strength=0.5)
    assert not final.refined and final.image is preview.image and "unusable latents" in final.reason


def test_a_diverged_refinement_is_not_retried():
    diverged = httpx.Response(500, json={"error": {"code": "non_finite_result", "message": "NaN latents"}})
    client, calls = _mock_client([diverged], retries=3, backoff=0.01)
    with pytest.raises(CloudError, match="NaN latents"):
        client.refine(_zeros_request())
    assert len(calls) == 1


# ----- one wire schema (server/schemas.py) ----------------------------------------------------
def test_the_client_sends_the_servers_schema_and_checks_it_first():
    from diffusionx.server.schemas import RefineBody

    good = httpx.Response(200, json=_answer(latents_to_bytes(torch.zeros(1, 4, 16, 16))))
    client, calls = _mock_client([good], retries=0)
    request = RefineRequest(prompt="x", strength=0.5, seed=3, latents=latents_to_bytes(torch.zeros(1, 4, 16, 16)))
    client.refine(request)
    sent = RefineBody.model_validate_json(calls[0].content)  # what the server validates with
    assert sent == RefineBody.from_request(request) and sent.to_request().latents == request.latents
    with pytest.raises(InvalidInputError, match="scheduler"):  # refused here, before any HTTP call
        client.refine(RefineRequest(prompt="x", strength=0.5, scheduler="plms", latents=request.latents))
    assert len(calls) == 1


def test_the_client_imports_without_the_servers_packages():
    import subprocess
    import sys

    blocked = ["fastapi", "starlette", "uvicorn", "ray", "redis"]
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
        "import diffusionx.client, diffusionx.server.schemas; print('imported')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr

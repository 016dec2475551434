"""The cloud refinement service: continuous batching, and the HTTP API on a real loopback server."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from diffusionx.cloud import CloudRefiner, RefineRequest
from diffusionx.errors import InvalidInputError
from diffusionx.models import call_in_short_lived_thread
from diffusionx.server.app import Limits, create_app, load_tokens
from diffusionx.server.batching import BatchingRefiner, ServiceUnavailableError
from diffusionx.server.run import start_in_thread
from diffusionx.wire import image_to_png, latents_from_bytes, latents_to_bytes

TOKEN, OTHER = "test-token-aaaa", "test-token-bbbb"
PROMPT = "a large red circle on the left on a blue background"


def latent_bytes(engine, seed: int = 0, dtype: str = "fp32") -> bytes:
    latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(seed))
    return latents_to_bytes(latents, dtype)


def request(engine, **kw) -> RefineRequest:
    return RefineRequest(
        **{
            "prompt": PROMPT,
            "strength": 0.5,
            "steps": 4,
            "seed": 1,
            "guidance_scale": 1.0,
            "latents": latent_bytes(engine),
            **kw,
        }
    )


def body(engine, **kw) -> dict:
    return {
        "prompt": PROMPT,
        "strength": 0.5,
        "steps": 4,
        "seed": 1,
        "guidance": 1.0,
        "latent": base64.b64encode(latent_bytes(engine)).decode(),
        **kw,
    }


def assert_one_fp16_step(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` (fp16 from the wire) is `want` (fp32) rounded to fp16, up to one fp16 step: batching
    changes float rounding, which may move a value across a rounding boundary."""
    torch.testing.assert_close(got, as_fp16(want), atol=1e-4, rtol=2**-10)


def as_fp16(latents: torch.Tensor) -> torch.Tensor:
    return latents_from_bytes(latents_to_bytes(latents))


def reference(engine, req: RefineRequest) -> torch.Tensor:
    """The request run alone through the engine, in fp32 (the answer is rounded to fp16)."""
    return engine.generate(
        req.prompt,
        seed=req.seed,
        steps=req.steps,
        strength=req.strength,
        guidance_scale=req.guidance_scale,
        scheduler=req.scheduler,
        init_latents=latents_from_bytes(req.latents),
        decode=False,
    ).latents


# ----- continuous batching (no HTTP) ----------------------------------------------------------
@pytest.fixture
def batcher(untrained_pair):
    refiner = BatchingRefiner(untrained_pair.cloud, max_batch=4)
    yield refiner
    refiner.close(drain=False, timeout=60)


def test_batched_result_equals_unbatched_at_mixed_strengths(untrained_pair, batcher, count_unet_calls):
    engine = untrained_pair.cloud
    requests = [
        request(engine, strength=1.0, steps=5, seed=11),
        request(engine, strength=0.6, steps=5, seed=12, guidance_scale=7.5, latents=latent_bytes(engine, 2)),
        request(engine, strength=0.4, steps=5, seed=13, scheduler="euler", latents=latent_bytes(engine, 3)),
    ]
    counter = count_unet_calls(engine.unet)
    futures = [batcher.submit(r) for r in requests]
    results = [f.result(timeout=120) for f in futures]
    batch_calls = len(counter.batches)
    for req, result in zip(requests, results):
        assert result.largest_batch >= 2, "the requests should have shared U-Net calls"
        assert_one_fp16_step(latents_from_bytes(result.payload), reference(engine, req))
    assert batch_calls < sum(r.unet_steps for r in results)  # 5 + 3 + 2 steps in fewer calls


def test_late_request_joins_mid_flight_and_leaves_first(untrained_pair, batcher):
    engine = untrained_pair.cloud
    long = batcher.submit(request(engine, strength=1.0, steps=12, seed=5))
    deadline = time.monotonic() + 60
    while batcher.load().unet_calls < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    short_request = request(engine, strength=0.25, steps=8, seed=6)  # 2 U-Net steps
    short = batcher.submit(short_request)
    result = short.result(timeout=60)
    assert not long.done(), "the short request should finish while the long one still runs"
    assert result.largest_batch == 2
    assert_one_fp16_step(latents_from_bytes(result.payload), reference(engine, short_request))
    assert long.result(timeout=60).unet_steps == 12


def test_strength_zero_and_bad_input(untrained_pair, batcher):
    engine = untrained_pair.cloud
    req = request(engine, strength=0.0)
    result = batcher.refine(req)
    assert result.unet_steps == 0
    # the input as it is on the wire by default: fp16
    torch.testing.assert_close(latents_from_bytes(result.payload), as_fp16(latents_from_bytes(req.latents)))
    with pytest.raises(InvalidInputError, match="shape"):  # 36x36 pixels: not a multiple of 16
        batcher.refine(request(engine, latents=latents_to_bytes(torch.zeros(1, 4, 9, 9))))
    assert batcher.load().failed == 1  # and the worker is still alive:
    assert batcher.refine(request(engine, strength=0.25)).unet_steps == 1


def test_close_finishes_accepted_work_then_refuses(untrained_pair):
    refiner = BatchingRefiner(untrained_pair.cloud, max_batch=1)
    futures = [refiner.submit(request(untrained_pair.cloud, seed=s)) for s in range(3)]
    assert refiner.load().estimated_wait_s >= 0
    assert refiner.close(drain=True, timeout=120)
    assert all(f.result(timeout=0).unet_steps == 2 for f in futures)
    with pytest.raises(ServiceUnavailableError):
        refiner.submit(request(untrained_pair.cloud))


def test_png_requests_finishing_together_share_one_decode(untrained_pair, batcher):
    engine = untrained_pair.cloud
    requests = [request(engine, seed=s, return_format="png") for s in (41, 42)]
    futures = [batcher.submit(r) for r in requests]
    results = [f.result(timeout=120) for f in futures]
    for req, result in zip(requests, results):
        want = np.asarray(Image.open(io.BytesIO(CloudRefiner(engine).refine(req).payload))).astype(int)
        got = np.asarray(Image.open(io.BytesIO(result.payload))).astype(int)
        assert np.abs(got - want).max() <= 1


def test_requests_of_other_sizes_share_the_loop_not_the_u_net_call(untrained_pair, batcher, count_unet_calls):
    """Any size the model takes (here 64x64 and 96x96 pixels): one U-Net call per latent shape."""
    engine = untrained_pair.cloud
    larger = latents_to_bytes(torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(5)))
    requests = [request(engine, strength=1.0, steps=6, seed=2), request(engine, strength=0.9, steps=6, latents=larger)]
    counter = count_unet_calls(engine.unet)
    results = [f.result(timeout=120) for f in [batcher.submit(r) for r in requests]]
    assert set(counter.batches) == {1} and all(r.largest_batch == 1 for r in results)
    for req, result in zip(requests, results):  # alone in each call: the in-process bytes
        assert result.payload == CloudRefiner(engine).refine(req).payload
    assert latents_from_bytes(results[1].payload).shape == (1, 4, 24, 24)


def test_requests_are_prepared_on_the_step_thread_and_a_bad_one_fails_alone(untrained_pair):
    import threading

    refiner = BatchingRefiner(untrained_pair.cloud, max_batch=2)
    prepare, threads = refiner.refiner.prepare, []

    def recording(req):
        threads.append(threading.current_thread().name)
        if req.seed == 2:
            raise InvalidInputError("this one cannot be prepared")
        return prepare(req)

    refiner.refiner.prepare = recording
    try:
        futures = [refiner.submit(request(untrained_pair.cloud, seed=i)) for i in range(5)]
        with pytest.raises(InvalidInputError, match="cannot be prepared"):
            futures[2].result(timeout=120)
        done = [f.result(timeout=120) for k, f in enumerate(futures) if k != 2]
        assert len(done) == 4 and refiner.failed == 1 and refiner.completed == 4
        # all torch work on one thread: a second one would throttle OpenMP for both (batching.py)
        assert set(threads) == {refiner._thread.name}
        assert refiner.load().queue_depth == 0 and refiner.idle
    finally:
        assert refiner.close()


def test_a_model_is_loaded_on_a_thread_that_ends_and_its_errors_reach_the_caller():
    seen = []

    def load(name, *, size):
        seen.append(threading.current_thread())
        if name == "missing":
            raise FileNotFoundError("no such model")
        return torch.zeros(size)

    assert call_in_short_lived_thread(load, "embedded", size=3).shape == (3,)
    (loader,) = seen
    assert loader is not threading.current_thread() and not loader.is_alive()  # its OpenMP team went with it
    with pytest.raises(FileNotFoundError, match="no such model"):
        call_in_short_lived_thread(load, "missing", size=1)


def test_load_pair_loads_on_a_thread_that_ends(monkeypatch):
    import diffusionx.models as models

    loaders, load_side = [], models._load_side

    def recording(*args, **kwargs):
        loaders.append(threading.current_thread())
        return load_side(*args, **kwargs)

    monkeypatch.setattr(models, "_load_side", recording)
    pair = models.load_pair("untrained")
    assert pair.edge is not None and pair.cloud is not None and len(loaders) == 2
    assert all(t is not threading.current_thread() and not t.is_alive() for t in loaders)


def test_a_crashed_worker_fails_its_requests_instead_of_hanging(untrained_pair):
    refiner = BatchingRefiner(untrained_pair.cloud, max_batch=2)

    def broken():
        raise RuntimeError("a bug in the loop")

    refiner._step = broken
    future = refiner.submit(request(untrained_pair.cloud))
    with pytest.raises(ServiceUnavailableError, match="crashed"):
        future.result(timeout=60)
    refiner._thread.join(10)
    assert not refiner.alive and isinstance(refiner.crashed, RuntimeError)
    with pytest.raises(ServiceUnavailableError):
        refiner.submit(request(untrained_pair.cloud))


# ----- HTTP ------------------------------------------------------------------------------------
LIMITS = Limits(
    max_body_bytes=64 * 1024,
    max_prompt_chars=200,
    max_steps=50,
    max_concurrent_per_token=2,
    rate_per_minute=600,
    burst=100,
)


@pytest.fixture(scope="module")
def server(untrained_pair):
    app = create_app(untrained_pair.cloud, tokens={TOKEN, OTHER}, max_batch=4, limits=LIMITS)
    running = start_in_thread(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
        yield client


def test_round_trip_equals_in_process_refinement(untrained_pair, http):
    engine = untrained_pair.cloud
    fp16 = latent_bytes(engine, 3, "fp16")  # what the edge sends; the answer comes back in fp16 too
    response = http.post("/v1/refine", json=body(engine, seed=7, strength=0.75, latent=_b64(fp16)))
    assert response.status_code == 200, response.text
    data = response.json()
    expected = CloudRefiner(engine).refine(request(engine, seed=7, strength=0.75, latents=fp16)).payload
    torch.testing.assert_close(
        latents_from_bytes(base64.b64decode(data["payload"])), latents_from_bytes(expected), atol=1e-3, rtol=0
    )  # at most one fp16 rounding step apart
    fp32 = http.post("/v1/refine", json=body(engine, seed=7, strength=0.75)).json()  # fp32 in -> fp16 out
    assert len(base64.b64decode(fp32["payload"])) == len(base64.b64decode(data["payload"]))
    assert data["unet_steps"] == 3 and data["cost"]["unet_steps"] == 3 and data["cost"]["unet_compute_s"] > 0
    assert set(data["timings"]) >= {"queue_s", "unet_s", "decode_s", "total_s"}


def test_png_in_and_out(untrained_pair, http):
    engine = untrained_pair.cloud
    png = image_to_png(Image.new("RGB", (engine.default_size,) * 2, (200, 30, 30)))
    response = http.post(
        "/v1/refine", json=body(engine, latent=None, image=base64.b64encode(png).decode(), return_format="png")
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["media_type"] == "image/png" and data["timings"]["decode_s"] > 0
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["payload"]))))
    want = CloudRefiner(engine).refine(request(engine, latents=None, image_png=png, return_format="png")).payload
    assert np.abs(got.astype(int) - np.asarray(Image.open(io.BytesIO(want))).astype(int)).max() <= 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("case", ["fp16", "fp32", "png in", "png out", "96x96 latents", "96x96 png"])
def test_the_server_answers_the_in_process_bytes(untrained_pair, http, case):
    """One refine contract: the same request through CloudRefiner and through the batching server
    gives the same payload bytes (fp16 latents whatever the request's precision; any size the
    model takes, not only its own)."""
    engine = untrained_pair.cloud
    larger = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(5))
    change = {
        "fp16": {"latents": latent_bytes(engine, 3, "fp16")},
        "fp32": {"latents": latent_bytes(engine, 3, "fp32")},
        "png in": {"latents": None, "image_png": image_to_png(Image.new("RGB", (64, 64), (200, 30, 30)))},
        "png out": {"return_format": "png"},
        "96x96 latents": {"latents": latents_to_bytes(larger)},
        "96x96 png": {"latents": None, "image_png": image_to_png(Image.new("RGB", (96, 96))), "return_format": "png"},
    }[case]
    req = request(engine, seed=8, **change)
    wire = {
        "latent": None if req.latents is None else _b64(req.latents),
        "image": None if req.image_png is None else _b64(req.image_png),
        "return_format": req.return_format,
    }
    response = http.post("/v1/refine", json=body(engine, seed=8, **wire))
    assert response.status_code == 200, response.text
    payload = base64.b64decode(response.json()["payload"])
    assert payload == CloudRefiner(engine).refine(req).payload
    if case == "96x96 latents":
        assert latents_from_bytes(payload).shape == (1, 4, 24, 24)
    if case == "96x96 png":
        assert Image.open(io.BytesIO(payload)).size == (96, 96)


@pytest.mark.parametrize(
    "change, status, fragment",
    [
        ({"strength": 1.5}, 422, "strength"),
        ({"steps": 0}, 422, "steps"),
        ({"steps": 51}, 422, "at most 50"),
        ({"prompt": "x" * 201}, 422, "at most 200"),
        ({"prompt": "  "}, 422, "prompt is empty"),
        ({"scheduler": "plms"}, 422, "scheduler"),
        ({"return_format": "jpeg"}, 422, "return_format"),
        ({"colour": "red"}, 422, "colour"),
        ({"latent": None}, 422, "exactly one"),
        ({"image": "aGVsbG8="}, 422, "exactly one"),
        ({"latent": "not base64!"}, 400, "base64"),
        ({"latent": _b64(b"\x00" * 64)}, 400, "safetensors"),
        ({"latent": _b64(latents_to_bytes(torch.zeros(1, 4, 9, 9)))}, 422, "shape"),  # 36x36 pixels
        ({"latent": _b64(latents_to_bytes(torch.zeros(1, 3, 16, 16)))}, 422, "shape"),
        ({"latent": None, "image": _b64(b"GIF89a....")}, 400, "PNG"),
        ({"latent": None, "image": _b64(image_to_png(Image.new("RGB", (40, 40))))}, 422, "multiples of 16"),
        ({"seed": -1}, 422, "seed"),
    ],
)
def test_validation_errors(untrained_pair, http, change, status, fragment):
    response = http.post("/v1/refine", json=body(untrained_pair.cloud, **change))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and fragment in error["message"]


@pytest.mark.parametrize("kind", ["latent", "image"])
def test_the_payload_is_parsed_once_per_request(untrained_pair, http, monkeypatch, kind):
    """Validation, the idempotency fingerprint and the refinement read one parsed tensor (or image):
    the latent used to be parsed from safetensors four times on the server."""
    import diffusionx.wire as wire

    engine = untrained_pair.cloud
    png = image_to_png(Image.new("RGB", (64, 64), (10, 200, 10)))
    payload = body(engine, seed=61) if kind == "latent" else body(engine, seed=61, latent=None, image=_b64(png))
    calls = []
    if kind == "latent":
        parse = wire.load_safetensors
        monkeypatch.setattr(wire, "load_safetensors", lambda data: calls.append(1) or parse(data))
    else:
        open_png = Image.open
        monkeypatch.setattr(Image, "open", lambda *args, **kw: calls.append(1) or open_png(*args, **kw))
    response = http.post("/v1/refine", json=payload, headers={"Idempotency-Key": f"parsed-once-{kind}"})
    assert response.status_code == 200, response.text
    assert len(calls) == 1


@pytest.mark.parametrize("side", [10000, 14000])  # 100 M pixels; 196 M (past PIL's bomb limit)
def test_huge_png_is_refused_from_its_header(untrained_pair, http, side):
    bomb = image_to_png(Image.new("1", (side, side)))  # a small file that decodes to gigabytes
    assert len(bomb) < LIMITS.max_body_bytes // 2
    start = time.perf_counter()
    response = http.post("/v1/refine", json=body(untrained_pair.cloud, latent=None, image=_b64(bomb)))
    assert response.status_code == 422 and response.json()["error"]["code"] == "image_size"
    assert time.perf_counter() - start < 5


def test_int_latents_are_refused(untrained_pair, http):
    from safetensors.torch import save

    data = save({"latents": torch.zeros(1, 4, 16, 16, dtype=torch.int32)})
    response = http.post("/v1/refine", json=body(untrained_pair.cloud, latent=_b64(data)))
    assert response.status_code == 422 and "fp16 or fp32" in response.json()["error"]["message"]


def test_malformed_and_oversized_bodies(http):
    json_type = {"Content-Type": "application/json"}
    response = http.post("/v1/refine", content=b"{not json", headers=json_type)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = http.post("/v1/refine", content=b"[1, 2]", headers=json_type)
    assert response.status_code == 400
    big = b"x" * (LIMITS.max_body_bytes + 1)
    response = http.post("/v1/refine", content=big, headers=json_type)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(LIMITS.max_body_bytes // 1024 + 2):
            yield b"x" * 1024

    response = http.post("/v1/refine", content=chunked(), headers=json_type)
    assert response.status_code == 413


def test_auth(untrained_pair, server):
    payload = body(untrained_pair.cloud)
    response = httpx.post(server.url + "/v1/refine", json=payload)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    response = httpx.post(server.url + "/v1/refine", json=payload, headers={"Authorization": "Basic abc"})
    assert response.status_code == 401
    response = httpx.post(server.url + "/v1/refine", json=payload, headers={"Authorization": "Bearer wrong-token"})
    assert response.status_code == 403 and "not accepted" in response.json()["error"]["message"]


def test_tokens_required_unless_insecure(untrained_pair, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSIONX_TOKENS", raising=False)
    with pytest.raises(InvalidInputError, match="--insecure"):
        create_app(CloudRefiner(untrained_pair.cloud))
    file = tmp_path / "tokens"
    file.write_text("# edge devices\nfirst-token-123\n\nsecond-token-456  # lab\n")
    monkeypatch.setenv("DIFFUSIONX_TOKENS", "third-token-789, fourth-token-000")
    assert load_tokens(file) == {"first-token-123", "second-token-456", "third-token-789", "fourth-token-000"}
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_tokens(tmp_path / "missing")


def test_idempotency_key_returns_the_first_result(untrained_pair, server, http):
    service = server.server.config.app.state.service
    payload = body(untrained_pair.cloud, seed=21)
    before = service.refiner.load().completed
    first = http.post("/v1/refine", json=payload, headers={"Idempotency-Key": "k-21"})
    second = http.post("/v1/refine", json=payload, headers={"Idempotency-Key": "k-21"})
    assert first.status_code == second.status_code == 200
    assert second.headers.get("idempotent-replay") == "true"
    assert first.json()["payload"] == second.json()["payload"]
    assert first.json()["request_id"] == second.json()["request_id"]
    assert service.refiner.load().completed == before + 1
    # the same key is per token: another token's request with it is its own
    other = httpx.post(
        server.url + "/v1/refine",
        json=payload,
        timeout=60,
        headers={"Authorization": f"Bearer {OTHER}", "Idempotency-Key": "k-21"},
    )
    assert other.status_code == 200 and "idempotent-replay" not in other.headers
    reused = http.post("/v1/refine", json={**payload, "seed": 22}, headers={"Idempotency-Key": "k-21"})
    assert reused.status_code == 422 and "different request" in reused.json()["error"]["message"]


@pytest.fixture
def quota_server(untrained_pair):
    limits = Limits(max_concurrent_per_token=1, rate_per_minute=6, burst=3)  # refill: 1 per 10 s
    running = start_in_thread(create_app(untrained_pair.cloud, tokens={TOKEN, OTHER}, max_batch=2, limits=limits))
    yield running
    running.stop()


def test_concurrency_and_rate_quotas(untrained_pair, quota_server):
    url = quota_server.url + "/v1/refine"
    engine = untrained_pair.cloud
    auth = {"Authorization": f"Bearer {TOKEN}"}
    long_result = {}
    thread = threading.Thread(
        target=lambda: long_result.update(
            r=httpx.post(url, json=body(engine, strength=1.0, steps=10), headers=auth, timeout=120)
        )
    )
    thread.start()
    service = quota_server.server.config.app.state.service
    deadline = time.monotonic() + 30
    while service.refiner.load().running + service.refiner.load().queue_depth == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = httpx.post(url, json=body(engine), headers=auth, timeout=60)
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
    assert "in flight" in busy.json()["error"]["message"]
    thread.join(120)
    assert long_result["r"].status_code == 200

    other = {"Authorization": f"Bearer {OTHER}"}  # its own bucket: burst 3, then 1 per 10 s
    statuses = [httpx.post(url, json=body(engine, strength=0.0), headers=other, timeout=60) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert statuses[-1].json()["error"]["code"] == "rate_limited"
    assert 1 <= int(statuses[-1].headers["retry-after"]) <= 10


def test_too_many_concurrent_retry_after_is_the_estimated_wait(untrained_pair, quota_server):
    """Retry-After for a token at its concurrency limit used to say 1 s however long its request
    had left; it is now when that request should finish (remaining steps x the step time)."""
    url = quota_server.url + "/v1/refine"
    engine = untrained_pair.cloud
    auth = {"Authorization": f"Bearer {TOKEN}"}
    service = quota_server.server.config.app.state.service
    slow = engine.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.2))  # >= 0.2 s a step
    long_result = {}
    thread = threading.Thread(
        target=lambda: long_result.update(
            r=httpx.post(url, json=body(engine, strength=1.0, steps=20), headers=auth, timeout=120)
        )
    )
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while service.refiner.load().unet_calls < 2:  # the step time is known; >= 8 steps remain
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = httpx.post(url, json=body(engine), headers=auth, timeout=60)
        thread.join(120)
    finally:
        slow.remove()
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "too_many_concurrent"
    assert "finish in about" in busy.json()["error"]["message"]
    assert 2 <= int(busy.headers["retry-after"]) <= 120
    assert long_result["r"].status_code == 200


def test_drain_finishes_in_flight_and_refuses_new(untrained_pair, quota_server):
    url = quota_server.url
    engine = untrained_pair.cloud
    service = quota_server.server.config.app.state.service
    auth = {"Authorization": f"Bearer {TOKEN}"}
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            r=httpx.post(url + "/v1/refine", json=body(engine, strength=1.0, steps=6), headers=auth, timeout=120)
        )
    )
    thread.start()
    deadline = time.monotonic() + 60
    while service.refiner.load().running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    drained = threading.Thread(target=service.drain)
    drained.start()
    while not service.draining:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    refused = httpx.post(url + "/v1/refine", json=body(engine), headers=auth, timeout=60)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert httpx.get(url + "/v1/health").status_code == 503
    thread.join(120)
    drained.join(120)
    assert result["r"].status_code == 200 and result["r"].json()["unet_steps"] == 6


def test_any_refiner_can_be_served_one_at_a_time(untrained_pair):
    engine = untrained_pair.cloud
    running = start_in_thread(create_app(CloudRefiner(engine), insecure=True))
    try:
        response = httpx.post(running.url + "/v1/refine", json=body(engine, seed=3), timeout=60)
        load = httpx.get(running.url + "/v1/load").json()
    finally:
        running.stop()
    assert response.status_code == 200, response.text
    expected = CloudRefiner(engine).refine(request(engine, seed=3)).payload
    assert base64.b64decode(response.json()["payload"]) == expected
    assert load["max_batch"] == 1 and load["completed"] == 1


def test_a_failing_refinement_is_a_json_500(untrained_pair):
    class Broken:
        def refine(self, request):
            raise RuntimeError("the accelerator fell off")

    running = start_in_thread(create_app(Broken(), insecure=True))
    try:
        response = httpx.post(running.url + "/v1/refine", json=body(untrained_pair.cloud), timeout=60)
    finally:
        running.stop()
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "refinement_failed"


def test_full_queue_is_503_with_retry_after(untrained_pair):
    running = start_in_thread(create_app(untrained_pair.cloud, insecure=True, limits=Limits(max_queue=0)))
    try:
        response = httpx.post(running.url + "/v1/refine", json=body(untrained_pair.cloud), timeout=60)
    finally:
        running.stop()
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert "queue is full" in response.json()["error"]["message"]


def test_health_load_metrics_openapi(server, http):
    health = http.get("/v1/health").json()
    assert health["status"] == "ok" and health["latent_shape"] == [1, 4, 16, 16]
    load = http.get("/v1/load").json()
    assert {"queue_depth", "running", "step_time_s", "estimated_wait_s", "max_batch"} <= set(load)
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE diffusionx_refine_seconds histogram" in metrics.text
    assert 'diffusionx_http_requests_total{path="/v1/refine",status="200"}' in metrics.text
    spec = http.get("/openapi.json").json()
    refine = spec["paths"]["/v1/refine"]["post"]
    assert "prompt" in refine["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "401", "413", "415", "422", "429", "503"} <= set(refine["responses"])
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# ----- hostile and broken clients (issue 18) --------------------------------------------------
def test_non_ascii_tokens_are_403_and_do_not_break_other_tokens(untrained_pair):
    """hmac.compare_digest raises on non-ASCII str: a non-ASCII bearer token was a 500, and a
    non-ASCII token in the tokens file broke every token checked after it."""
    accented = [f"tökén-ünïcode-{i:02d}" for i in range(20)]  # many: the set's order cannot hide the bug
    running = start_in_thread(create_app(untrained_pair.cloud, tokens={TOKEN, *accented}, insecure=False))
    payload = body(untrained_pair.cloud, strength=0.0)
    try:
        url = running.url + "/v1/refine"
        wrong = httpx.post(url, json=payload, headers={"Authorization": "Bearer wröng-tökén".encode()}, timeout=60)
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        ascii_ok = httpx.post(url, json=payload, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert ascii_ok.status_code == 200, ascii_ok.text
        utf8 = {"Authorization": f"Bearer {accented[7]}".encode()}  # sent as UTF-8, as in the file
        assert httpx.post(url, json=payload, headers=utf8, timeout=60).status_code == 200
    finally:
        running.stop()


def test_tokens_file_is_read_as_utf8(tmp_path):
    file = tmp_path / "tokens"
    file.write_bytes("tökén-ünïcode-1\n".encode())
    assert load_tokens(file, env={}) == {"tökén-ünïcode-1"}


class _ExplodingRefiner:
    """A refiner with a bug: submit() raises something the server does not expect."""

    max_batch = 1

    def load(self):
        from diffusionx.server.batching import LoadReport

        return LoadReport(0, 0, 1, 0.0, 0.0, 0, 0, 0, False)

    def submit(self, request):
        raise RuntimeError("a bug in submit")

    def close(self, drain=True, timeout=None):
        return True


def test_unexpected_errors_are_logged_with_an_id_the_client_sees(untrained_pair, caplog):
    running = start_in_thread(create_app(_ExplodingRefiner(), insecure=True))
    try:
        with caplog.at_level("ERROR", logger="diffusionx.server.app"):
            response = httpx.post(running.url + "/v1/refine", json=body(untrained_pair.cloud), timeout=60)
    finally:
        running.stop()
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
    error_id = response.headers["x-error-id"]
    assert error_id in response.json()["error"]["message"]
    records = [r for r in caplog.records if error_id in r.getMessage()]
    assert records, "the 500 says the server log has the details: it must"
    assert "/v1/refine" in records[0].getMessage() and records[0].exc_info is not None
    assert "a bug in submit" in str(records[0].exc_info[1])


def test_a_client_hanging_up_mid_upload_is_not_a_500(untrained_pair):
    running = start_in_thread(create_app(untrained_pair.cloud, insecure=True))
    try:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/refine HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100000\r\n\r\n{"prompt": "a red'
            )
            time.sleep(0.2)  # let the server start reading the body
        deadline = time.monotonic() + 30
        while 'diffusionx_client_disconnects_total{path="/v1/refine"} 1' not in (
            metrics := httpx.get(running.url + "/metrics", timeout=10).text
        ):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
    finally:
        running.stop()
    assert 'status="500"' not in metrics


def _filled(engine, value: float, where: str = "all") -> bytes:
    latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(0))
    if where == "all":
        latents.fill_(value)
    else:
        latents[0, 0, 0, 0] = value
    return latents_to_bytes(latents, "fp32")


@pytest.mark.parametrize(
    "value, where",
    [
        (1e30, "all"),
        (1e30, "one"),
        (2000.0, "all"),
        (float("inf"), "one"),
        (float("-inf"), "all"),
        (float("nan"), "one"),
    ],
)
def test_non_finite_or_absurd_latents_are_refused(untrained_pair, http, value, where):
    """fp32 latents of 1e30 used to be accepted and answered 200 with an all-NaN result."""
    response = http.post(
        "/v1/refine", json=body(untrained_pair.cloud, latent=_b64(_filled(untrained_pair.cloud, value, where)))
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "latent_out_of_range" and "1000" in error["message"]


def test_latents_near_the_limit_are_accepted(untrained_pair, http):
    response = http.post(
        "/v1/refine", json=body(untrained_pair.cloud, latent=_b64(_filled(untrained_pair.cloud, 900.0, "one")))
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def nan_unet(untrained_pair):
    """The cloud U-Net diverges: every call returns NaN."""
    handle = untrained_pair.cloud.unet.register_forward_hook(
        lambda module, args, out: (torch.full_like(out[0], float("nan")), *out[1:])
    )
    yield
    handle.remove()


@pytest.mark.parametrize("return_format", ["latent", "png"])
def test_a_diverged_refinement_is_never_a_success(untrained_pair, http, nan_unet, return_format):
    response = http.post("/v1/refine", json=body(untrained_pair.cloud, seed=77, return_format=return_format))
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "non_finite_result" and "NaN" in error["message"]


def test_cloud_refiner_raises_on_a_diverged_refinement(untrained_pair, nan_unet):
    from diffusionx.wire import NonFiniteResultError

    with pytest.raises(NonFiniteResultError, match="NaN"):
        CloudRefiner(untrained_pair.cloud).refine(request(untrained_pair.cloud))


def test_any_refiners_non_finite_result_is_a_500(untrained_pair):
    class Diverging:
        def refine(self, req):
            result = CloudRefiner(untrained_pair.cloud).refine(req)
            result.payload = latents_to_bytes(torch.full(untrained_pair.cloud.latent_shape(), float("nan")))
            return result

    running = start_in_thread(create_app(Diverging(), insecure=True))
    try:
        response = httpx.post(running.url + "/v1/refine", json=body(untrained_pair.cloud, strength=0.0), timeout=60)
    finally:
        running.stop()
    assert response.status_code == 500 and response.json()["error"]["code"] == "non_finite_result"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonp"])
def test_a_body_that_is_not_declared_json_is_415(untrained_pair, http, content_type):
    """Content-Type used to be ignored: any body that parsed as JSON was taken."""
    raw = json.dumps(body(untrained_pair.cloud, strength=0.0)).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = http.post("/v1/refine", content=raw, headers=headers)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_json(untrained_pair, http):
    raw = json.dumps(body(untrained_pair.cloud, strength=0.0)).encode()
    response = http.post("/v1/refine", content=raw, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "change",
    [{"strength": "0.5"}, {"strength": True}, {"steps": "4"}, {"steps": 4.0}, {"seed": True}, {"guidance": "7.5"}],
)
def test_numbers_are_not_coerced(untrained_pair, http, change):
    """ "0.5" and true used to be taken as numbers."""
    response = http.post("/v1/refine", json=body(untrained_pair.cloud, **change))
    assert response.status_code == 422, response.text
    assert next(iter(change)) in response.json()["error"]["message"]


def test_an_integer_strength_is_still_a_number(untrained_pair, http):
    response = http.post("/v1/refine", json=body(untrained_pair.cloud, strength=0, guidance=1))
    assert response.status_code == 200, response.text


def test_openapi_declares_the_bearer_scheme_and_the_limits(http):
    spec = http.get("/openapi.json").json()
    refine = spec["paths"]["/v1/refine"]["post"]
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert refine["security"] == [{"bearer": []}]
    schema = refine["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert schema["prompt"]["maxLength"] == LIMITS.max_prompt_chars and schema["steps"]["maximum"] == LIMITS.max_steps
    for field in ("latent", "image"):
        assert {"type": "string", "maxLength": LIMITS.max_body_bytes} in schema[field]["anyOf"]
    assert str(LIMITS.max_body_bytes) in refine["requestBody"]["description"]
    key = next(p for p in refine["parameters"] if p["name"] == "Idempotency-Key")
    assert key["schema"] == {"type": "string", "minLength": 1, "maxLength": 200}


def test_openapi_of_an_insecure_server_declares_no_security(untrained_pair):
    spec = create_app(CloudRefiner(untrained_pair.cloud), insecure=True).openapi()
    assert "security" not in spec["paths"]["/v1/refine"]["post"]
    assert "securitySchemes" not in spec.get("components", {})


def test_a_serial_refiner_estimates_when_a_request_finishes():
    from diffusionx.cloud import RefineResult
    from diffusionx.server.app import _SerialRefiner

    gate = threading.Event()

    class Gated:
        def refine(self, req):
            assert gate.wait(30)
            return RefineResult(payload=b"", return_format="latent", strength=0.5, steps=4, unet_steps=2)

    serial = _SerialRefiner(Gated())
    req = RefineRequest(prompt="x", strength=0.5, latents=b"-")
    assert serial.finish_estimate_s([]) is None
    gate.set()
    serial.submit(req).result(30)  # one timed refinement
    gate.clear()
    first, second = serial.submit(req), serial.submit(req)
    try:
        one, two = serial.finish_estimate_s([first]), serial.finish_estimate_s([second])
        assert one is not None and two is not None and two > one >= 0
        assert serial.finish_estimate_s([first, second]) == pytest.approx(one, abs=0.05)
    finally:
        gate.set()
        serial.close()
    assert serial.finish_estimate_s([first]) is None  # done: not in line any more


def test_serve_refuses_a_negative_switch_interval(tmp_path, capsys):
    from diffusionx.cli import main

    assert main(["serve", "--insecure", "--state-dir", str(tmp_path), "--switch-interval", "-1"]) == 2
    assert "--switch-interval must be >= 0" in capsys.readouterr().err

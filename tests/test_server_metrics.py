"""The refine server's /metrics (prometheus_client, a registry per app) and its admission that
keeps a p95 target (429 overloaded + Retry-After), on a real loopback server (issue 20)."""

from __future__ import annotations

import argparse
import base64
import math
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from diffusionx.cloud import CloudRefiner, RefineRequest, RefineResult
from diffusionx.engine import Timing
from diffusionx.errors import InvalidInputError
from diffusionx.server.app import Limits, _SerialRefiner, create_app
from diffusionx.server.config import add_serve_arguments
from diffusionx.server.guards import admission_refusal
from diffusionx.server.metrics import CONTENT_TYPE_LATEST, RecentWork
from diffusionx.server.run import check_limits, limits_from_args, start_in_thread
from diffusionx.wire import latents_to_bytes

prometheus_parser = pytest.importorskip("prometheus_client.parser")

TOKEN = "test-token-metrics-aaaa"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "a large red circle on the left on a blue background"


def body(engine, **kw) -> dict:
    latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(kw.pop("latent_seed", 0)))
    return {
        "prompt": PROMPT,
        "strength": 0.5,
        "steps": 4,
        "seed": 1,
        "guidance": 1.0,
        "latent": base64.b64encode(latents_to_bytes(latents)).decode(),
        **kw,
    }


def scrape(url: str) -> tuple[dict[str, dict], httpx.Response]:
    """/metrics parsed by prometheus_client's own parser: {family name: {sample name + labels: value}}."""
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    families = {}
    for family in prometheus_parser.text_string_to_metric_families(response.text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families, response


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    return families[family][(sample or family, tuple(sorted(labels.items())))]


def wait_until(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def slow_unet(untrained_pair):
    """Every U-Net call at least 0.2 s: a refinement of n steps takes >= 0.2 n s."""
    handle = untrained_pair.cloud.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
    yield
    handle.remove()


# ----- /metrics ---------------------------------------------------------------------------------
def test_metrics_parse_and_the_histograms_count_the_requests(untrained_pair):
    engine = untrained_pair.cloud
    running = start_in_thread(create_app(engine, tokens={TOKEN}, max_batch=4))
    try:
        url = running.url

        def post(payload: dict, **headers: str) -> httpx.Response:
            return httpx.post(url + "/v1/refine", json=payload, headers={**AUTH, **headers}, timeout=120)

        answers = [post(body(engine, seed=s)) for s in range(3)]  # 2 U-Net steps each
        answers.append(post(body(engine, strength=0.0)))  # no U-Net call: no batch size
        keyed = body(engine, seed=9)
        answers.append(post(keyed, **{"Idempotency-Key": "m-1"}))
        answers.append(post(keyed, **{"Idempotency-Key": "m-1"}))  # replayed: answered, not computed
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert answers[-1].headers["idempotent-replay"] == "true"
        refused = httpx.post(url + "/v1/refine", json=keyed, timeout=60)  # no token
        assert refused.status_code == 401
        families, response = scrape(url)
    finally:
        running.stop()
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "diffusionx_refine_seconds" in families  # the names of the hand-written exposition stay
    # end to end: every 200 of /v1/refine, replays included
    assert value(families, "diffusionx_refine_seconds", "diffusionx_refine_seconds_count") == 6
    assert value(families, "diffusionx_refine_seconds", "diffusionx_refine_seconds_bucket", le="+Inf") == 6
    assert value(families, "diffusionx_refine_seconds", "diffusionx_refine_seconds_sum") > 0
    # what the refiner computed: 5 (the replay is not computed again)
    assert value(families, "diffusionx_queue_wait_seconds", "diffusionx_queue_wait_seconds_count") == 5
    assert value(families, "diffusionx_queue_wait_seconds", "diffusionx_queue_wait_seconds_sum") >= 0
    assert value(families, "diffusionx_compute_seconds", "diffusionx_compute_seconds_count") == 5
    assert value(families, "diffusionx_compute_seconds", "diffusionx_compute_seconds_sum") > 0
    batch_count = value(families, "diffusionx_batch_size", "diffusionx_batch_size_count")
    assert batch_count == 4  # the strength-0 refinement shared no U-Net call
    batch_sum = value(families, "diffusionx_batch_size", "diffusionx_batch_size_sum")
    assert batch_count <= batch_sum <= 4 * batch_count  # each between 1 and max_batch
    assert value(families, "diffusionx_batch_size", "diffusionx_batch_size_bucket", le="4.0") == 4
    # counters by path and status, and those the refiner keeps
    requests = "diffusionx_http_requests"
    assert value(families, requests, "diffusionx_http_requests_total", path="/v1/refine", status="200") == 6
    assert value(families, requests, "diffusionx_http_requests_total", path="/v1/refine", status="401") == 1
    assert value(families, "diffusionx_idempotent_replays", "diffusionx_idempotent_replays_total") == 1
    completed = "diffusionx_refinements_completed"
    assert value(families, completed, "diffusionx_refinements_completed_total") == 5
    calls = value(families, "diffusionx_unet_calls", "diffusionx_unet_calls_total")
    assert calls >= 8
    # the U-Net's busy time: positive, and less than the calls would take at a second each
    assert 0 < value(families, "diffusionx_unet_seconds", "diffusionx_unet_seconds_total") < calls
    assert value(families, "diffusionx_max_batch") == 4
    assert value(families, "diffusionx_queue_depth") == 0 and value(families, "diffusionx_draining") == 0
    assert (
        value(families, "diffusionx_client_disconnects", "diffusionx_client_disconnects_total", path="/v1/refine") == 0
    )
    assert value(families, "diffusionx_admission_refusals", "diffusionx_admission_refusals_total") == 0
    assert "diffusionx_target_p95_seconds" not in families  # no target: admission off
    # the share of the throughput bound: achieved / (b / (k t)) over the window
    per_s = value(families, "diffusionx_throughput_per_second")
    bound = value(families, "diffusionx_throughput_bound_per_second")
    share = value(families, "diffusionx_throughput_bound_share")
    batch = value(families, "diffusionx_recent_mean_batch")
    k = value(families, "diffusionx_recent_unet_steps_per_refinement")
    step = value(families, "diffusionx_step_seconds")
    assert per_s > 0 and bound > 0 and share > 0 and math.isfinite(share)
    assert 1 <= batch <= 4 and k == pytest.approx(8 / 5)
    assert bound == pytest.approx(batch / (k * step)) and share == pytest.approx(per_s / bound)


def test_each_app_has_its_own_registry(untrained_pair):
    from prometheus_client import REGISTRY

    engine = untrained_pair.cloud
    one = create_app(CloudRefiner(engine), insecure=True)
    two = create_app(CloudRefiner(engine), insecure=True)  # no "duplicated timeseries" error
    running = start_in_thread(one)
    try:
        response = httpx.post(running.url + "/v1/refine", json=body(engine), timeout=120)
        assert response.status_code == 200, response.text
        families, _ = scrape(running.url)
    finally:
        running.stop()
    # one at a time: every computed refinement ran at batch 1
    assert value(families, "diffusionx_batch_size", "diffusionx_batch_size_count") == 1
    assert value(families, "diffusionx_batch_size", "diffusionx_batch_size_sum") == 1
    assert value(families, "diffusionx_refine_seconds", "diffusionx_refine_seconds_count") == 1
    assert value(families, "diffusionx_step_seconds") > 0  # the one-at-a-time adapter reports it now
    text = two.state.service.metrics_text()[0].decode()
    other = {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}
    assert [s.value for s in other["diffusionx_refine_seconds"].samples if s.name.endswith("_count")] == [0]
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("diffusionx_")]


# ----- admission: the p95 target ----------------------------------------------------------------
def test_admission_rule_and_retry_after():
    assert admission_refusal(None, 100.0, 1.0) is None  # off
    assert admission_refusal(2.0, 0.5, 1.0) is None  # 1.5 s predicted, under the target
    assert admission_refusal(2.0, 0.0, 10.0) is None  # starts at once: never refused, however long
    err = admission_refusal(2.0, 4.2, 1.0)  # 5.2 s predicted: under the target after 3.2 s
    assert err is not None and err.status == 429 and err.code == "overloaded"
    assert err.headers == {"Retry-After": "4"}
    assert "2 s" in err.message and "5.2 s" in err.message
    longer = admission_refusal(2.0, 4.2, 3.0)  # longer than the target alone: once a slot is free
    assert longer is not None and longer.headers == {"Retry-After": "5"}
    tiny = admission_refusal(1.0, 0.01, 1.0)  # just over: at least 1 s
    assert tiny is not None and tiny.headers == {"Retry-After": "1"}


def test_admission_refuses_over_the_target_and_never_an_idempotent_retry(untrained_pair, slow_unet):
    engine = untrained_pair.cloud
    limits = Limits(target_p95_s=0.05)  # far below one 0.2 s step: any queue is over it
    running = start_in_thread(create_app(engine, tokens={TOKEN}, max_batch=1, limits=limits))
    service = running.server.config.app.state.service
    url = running.url + "/v1/refine"
    long_body = body(engine, strength=1.0, steps=30, seed=5)  # >= 6 s with the slow U-Net
    key = {**AUTH, "Idempotency-Key": "long-1"}
    answers = {}
    first = threading.Thread(
        target=lambda: answers.update(first=httpx.post(url, json=long_body, headers=key, timeout=300))
    )
    try:
        first.start()
        wait_until(lambda: service.refiner.load().unet_calls >= 2, what="two timed steps")  # wait > 0 now
        busy = httpx.post(url, json=body(engine, seed=6), headers=AUTH, timeout=120)
        assert service.refiner.load().running == 1, "the long refinement ended too soon for this test"
        retry = httpx.post(url, json=long_body, headers=key, timeout=300)  # joins the computing key
        first.join(300)
        idle = httpx.post(url, json=body(engine, seed=7), headers=AUTH, timeout=120)  # a free slot
        families, _ = scrape(running.url)
    finally:
        running.stop()
    assert busy.status_code == 429, busy.text
    error = busy.json()["error"]
    assert error["status"] == 429 and error["code"] == "overloaded" and "p95 target" in error["message"]
    assert 1 <= int(busy.headers["retry-after"]) <= 300
    assert answers["first"].status_code == 200 and answers["first"].json()["unet_steps"] == 30
    assert retry.status_code == 200 and retry.headers["idempotent-replay"] == "true"
    assert retry.json()["request_id"] == answers["first"].json()["request_id"]
    assert idle.status_code == 200, idle.text
    assert value(families, "diffusionx_admission_refusals", "diffusionx_admission_refusals_total") == 1
    requests = "diffusionx_http_requests"
    assert value(families, requests, "diffusionx_http_requests_total", path="/v1/refine", status="429") == 1
    assert value(families, "diffusionx_target_p95_seconds") == 0.05


def test_admission_accepts_under_the_target(untrained_pair, slow_unet):
    engine = untrained_pair.cloud
    running = start_in_thread(create_app(engine, tokens={TOKEN}, max_batch=1, limits=Limits(target_p95_s=600)))
    service = running.server.config.app.state.service
    url = running.url + "/v1/refine"
    answers = {}
    first = threading.Thread(
        target=lambda: answers.update(
            first=httpx.post(url, json=body(engine, strength=1.0, steps=10, seed=2), headers=AUTH, timeout=300)
        )
    )
    try:
        first.start()
        wait_until(lambda: service.refiner.load().unet_calls >= 2, what="two timed steps")
        assert service.refiner.load().estimated_wait_s > 0  # this one queues
        queued = httpx.post(url, json=body(engine, seed=3), headers=AUTH, timeout=300)
        first.join(300)
        families, _ = scrape(running.url)
    finally:
        running.stop()
    assert queued.status_code == 200, queued.text
    assert answers["first"].status_code == 200
    assert value(families, "diffusionx_admission_refusals", "diffusionx_admission_refusals_total") == 0
    assert value(families, "diffusionx_queue_wait_seconds", "diffusionx_queue_wait_seconds_sum") > 0


def test_target_p95_flag():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert limits_from_args(parser.parse_args([])).target_p95_s is None
    limits = limits_from_args(parser.parse_args(["--target-p95", "2.5"]))
    check_limits(limits)
    assert limits.target_p95_s == 2.5
    for bad in ("0", "-1"):
        with pytest.raises(InvalidInputError, match="target-p95"):
            check_limits(limits_from_args(parser.parse_args(["--target-p95", bad])))


# ----- the window behind the throughput gauges and the admission estimate ----------------------
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _result(steps: int, unet_s: float) -> RefineResult:
    timing = Timing(unet_s=unet_s, unet_calls=steps)
    return RefineResult(payload=b"", return_format="latent", strength=0.5, steps=steps, unet_steps=steps, timing=timing)


def test_the_window_share_is_the_u_nets_busy_fraction():
    clock = _Clock()
    recent = RecentWork(window_s=60.0, clock=clock)
    calls = 0
    for _ in range(10):  # one refinement of 5 steps a second, two per U-Net call of 0.2 s
        clock.now += 1.0
        calls += 2.5
        recent.note_result(_result(5, 1.0), in_refiner_s=1.3, calls=int(calls))
    window = recent.window(25)
    assert window.seconds == 10.0 and window.done == 10 and window.calls == 25
    assert window.overhead_s == pytest.approx(0.3) and window.step_s(0.0) == pytest.approx(0.2)
    through = window.throughput(0.2, max_batch=8)
    assert through["per_s"] == pytest.approx(1.0) and through["mean_batch"] == pytest.approx(2.0)
    assert through["bound_per_s"] == pytest.approx(2.0 / (5 * 0.2))
    assert through["share"] == pytest.approx(25 * 0.2 / 10)
    clock.now += 120.0  # two idle minutes: nothing in the window
    idle = recent.window(25)
    assert idle.seconds == 60.0 and idle.done == 0 and idle.calls == 0
    assert idle.throughput(0.2, max_batch=8)["share"] == 0.0
    assert math.isnan(RecentWork(clock=clock).window().throughput(0.0, 8)["bound_per_s"])


def test_the_one_at_a_time_load_report_says_what_is_running_and_the_wait():
    gate = threading.Event()

    class Gated:
        def refine(self, req):
            assert gate.wait(30)
            return _result(2, 0.02)

    serial = _SerialRefiner(Gated())
    req = RefineRequest(prompt="x", strength=0.5, latents=b"-")
    assert serial.load().estimated_wait_s == 0.0 and serial.load().step_time_s == 0.0  # nothing timed yet
    gate.set()
    serial.submit(req).result(30)
    gate.clear()
    first, second = serial.submit(req), serial.submit(req)
    try:
        wait_until(lambda: serial.load().running == 1, 30, "the first to start")
        load = serial.load()
        assert load.queue_depth == 1 and load.estimated_wait_s > 0
        assert load.step_time_s == pytest.approx(0.01)
    finally:
        gate.set()
        first.result(30)
        second.result(30)
        serial.close()
    assert serial.load().running == 0 and serial.load().estimated_wait_s == 0.0


def test_the_package_imports_without_prometheus_client():
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import diffusionx, diffusionx.client, diffusionx.server, diffusionx.server.config\n"
        "import diffusionx.server.batching, diffusionx.server.schemas\n"
        "try:\n"
        "    import diffusionx.server.metrics\n"
        "except ImportError as err:\n"
        "    assert 'diffusionx[serve]' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('metrics imported without prometheus_client')\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr

"""What one HTTP client can hold on `diffusionx serve`: the header-read deadline (slowloris), the
header size limit, the body's idle timeout, keep-alive, the connection limit, and a drain that
is seen (health 503 while the listener stays open) and ends by its deadline. Real loopback
servers with the settings `diffusionx serve` uses (server/run.py: uvicorn_config); the
subprocess versions are in test_faults.py."""

from __future__ import annotations

import argparse
import base64
import contextlib
import socket
import threading
import time

import httpx
import pytest
import torch

from diffusionx.errors import InvalidInputError
from diffusionx.server.app import Limits, create_app
from diffusionx.server.config import add_serve_arguments
from diffusionx.server.run import check_limits, limits_from_args, start_in_thread, uvicorn_config
from diffusionx.wire import latents_to_bytes

PROMPT = "a large red circle on the left on a blue background"


def serve(engine, **limits):
    base = {"rate_per_minute": 6000, "burst": 100}
    return start_in_thread(create_app(engine, insecure=True, max_batch=4, limits=Limits(**{**base, **limits})))


def address(running) -> tuple[str, int]:
    host, port = running.url.removeprefix("http://").split(":")
    return host, int(port)


def closed_after(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (sending `trickle` a byte every 0.1 s meanwhile), or
    None if it is still open after `limit_s`."""
    start = time.monotonic()
    sock.settimeout(0.1)
    i = 0
    while time.monotonic() - start < limit_s:
        try:
            if i < len(trickle):
                sock.sendall(trickle[i : i + 1])
                i += 1
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return None


def body(engine, **kw) -> dict:
    latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(0))
    return {
        "prompt": PROMPT,
        "strength": 0.5,
        "steps": 4,
        "guidance": 1.0,
        "latent": base64.b64encode(latents_to_bytes(latents, "fp32")).decode(),
        **kw,
    }


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_deadline(untrained_pair):
    """Slowloris: uvicorn alone never closed a connection whose headers kept trickling in."""
    running = serve(untrained_pair.cloud, header_timeout_s=1.0, keep_alive_s=30.0)
    slow = b"GET /v1/health HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200
    try:
        with socket.create_connection(address(running)) as sock:
            took = closed_after(sock, 4.0, slow)
        assert took is not None and 0.7 < took < 2.5, took
        # on a keep-alive connection, the next request's headers have the same deadline
        with socket.create_connection(address(running)) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: test\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            took = closed_after(sock, 4.0, slow)
        assert took is not None and took < 2.5, took
        # a prompt client is not affected
        assert httpx.get(running.url + "/v1/health", timeout=10).status_code == 200
    finally:
        running.stop()


def test_a_huge_header_is_refused_without_being_read(untrained_pair):
    """A 32 MB header used to be read into memory whole."""
    running = serve(untrained_pair.cloud, max_header_bytes=16 * 1024)
    sent, answer = 0, b""
    total = 32 * 1024 * 1024
    try:
        with socket.create_connection(address(running)) as sock:
            sock.settimeout(5)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: test\r\nX-Big: ")
            chunk = b"a" * 65536
            try:
                while sent < total:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (ConnectionResetError, BrokenPipeError):
                pass
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                answer = sock.recv(65536)
        assert sent < total // 4, f"the server read {sent} bytes of header"
        assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:100]
        assert httpx.get(running.url + "/v1/health", timeout=10).status_code == 200
    finally:
        running.stop()


def test_a_stalled_body_is_a_408_and_the_connection_closes(untrained_pair):
    running = serve(untrained_pair.cloud, body_timeout_s=1.0)
    try:
        with socket.create_connection(address(running)) as sock:
            sock.sendall(
                b"POST /v1/refine HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b'Content-Length: 5000\r\n\r\n{"prompt": "a red'
            )
            start = time.monotonic()
            sock.settimeout(5)
            answer = sock.recv(65536)
            took = time.monotonic() - start
            closed = False
            while b'"body_timeout"' not in answer:  # headers and body may come in separate packets
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"body_timeout"' in answer and b"connection: close" in answer.lower()
            assert 0.7 < took < 3.0, took
            assert closed or closed_after(sock, 3.0) is not None
    finally:
        running.stop()


def test_an_idle_keep_alive_connection_is_closed(untrained_pair):
    running = serve(untrained_pair.cloud, keep_alive_s=1.0)
    try:
        with socket.create_connection(address(running)) as sock:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: test\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            took = closed_after(sock, 4.0)
        assert took is not None and took < 2.5, took
    finally:
        running.stop()


def test_connections_past_the_limit_get_503(untrained_pair):
    """No connection limit used to mean any number of held connections."""
    running = serve(untrained_pair.cloud, max_connections=3, header_timeout_s=30.0)
    held = [socket.create_connection(address(running)) for _ in range(3)]
    try:
        time.sleep(0.2)
        refused = httpx.get(running.url + "/v1/health", timeout=10)
        assert refused.status_code == 503
        held.pop().close()
        time.sleep(0.2)
        assert httpx.get(running.url + "/v1/health", timeout=10).status_code == 200  # 2 held + this one
    finally:
        for sock in held:
            sock.close()
        running.stop()


def test_serve_flags_reach_uvicorn():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    defaults = limits_from_args(parser.parse_args([]))
    assert (defaults.header_timeout_s, defaults.keep_alive_s, defaults.max_header_bytes) == (10.0, 5.0, 16384)
    assert (defaults.max_connections, defaults.drain_timeout_s, defaults.body_timeout_s) == (512, 25.0, 30.0)
    flags = (
        "--header-timeout 3 --body-timeout 7 --keep-alive 2 --max-header-bytes 8192 --max-connections 50 "
        "--drain-seconds 12 --drain-linger 2 --burst 40 --idempotency-lease 4"
    )
    args = parser.parse_args(flags.split())
    limits = limits_from_args(args)
    check_limits(limits)
    assert (limits.drain_timeout_s, limits.drain_linger_s, limits.burst, limits.idempotency_lease_s) == (12, 2, 40, 4)
    config = uvicorn_config(object(), limits)
    assert config.header_timeout_s == 3 and config.timeout_keep_alive == 2
    assert config.h11_max_incomplete_event_size == 8192 and config.limit_concurrency == 51
    assert config.timeout_graceful_shutdown == 12 and config.http.__name__ == "GuardedH11Protocol"
    for bad in ("--drain-seconds 0", "--drain-linger 30", "--max-header-bytes 100", "--header-timeout -1"):
        with pytest.raises(InvalidInputError):
            check_limits(limits_from_args(parser.parse_args(bad.split())))


def test_a_drain_is_seen_and_ends_when_the_work_is_done(untrained_pair):
    """The listener used to close at once on SIGTERM: health's 503 was never seen. Now the server
    keeps answering (health 503, new work 503) until its refinements in flight are done."""
    engine = untrained_pair.cloud
    running = serve(engine, drain_timeout_s=30.0)
    service = running.server.config.app.state.service
    # a client uploading its body slowly when the drain begins
    uploading = socket.create_connection(address(running))
    uploading.sendall(
        b"POST /v1/refine HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b'Content-Length: 5000\r\n\r\n{"prompt": "a red'
    )
    result = {}
    slow = threading.Thread(  # 100 guided U-Net steps: seconds, even on a fast CPU
        target=lambda: result.update(
            r=httpx.post(running.url + "/v1/refine", json=body(engine, strength=1.0, steps=100, guidance=7.5),
                         timeout=120)
        )
    )  # fmt: skip
    slow.start()
    try:
        deadline = time.monotonic() + 60
        while service.refiner.load().running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        running.server.begin_drain()  # what SIGTERM does (a signal cannot reach a server thread)
        health = httpx.get(running.url + "/v1/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(running.url + "/v1/refine", json=body(engine), timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert int(refused.headers["retry-after"]) >= 1
        uploading.settimeout(5)
        assert uploading.recv(65536).startswith(b"HTTP/1.1 503")  # at once, not at the deadline
        uploading.close()
        slow.join(120)
        assert result["r"].status_code == 200 and result["r"].json()["unet_steps"] == 100
        running.thread.join(30)
        assert not running.thread.is_alive()
        assert time.monotonic() - started < 30
    finally:
        running.stop()

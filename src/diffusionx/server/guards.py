"""The refine endpoint's guards: who may call (bearer tokens), how much (per-token rate and
concurrency quotas, and the admission that keeps the p95 target), and what it may send
(Content-Type, body size and pace, Idempotency-Key), each refusal an `ApiError` with its status,
code and headers; and the drain's guards (new work 503 while draining, answers cut off at the
drain's deadline).

Everything here runs before a request's JSON is parsed, or around waiting for its answer, except
the quotas and the admission, which the service (service.py) applies to a parsed request just
before it goes to the refiner (an idempotent retry that joins or replays never reaches them).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ..errors import InvalidInputError
from .config import Limits
from .schemas import IDEMPOTENCY_KEY_MAX, error_body

TOKENS_ENV = "DIFFUSIONX_TOKENS"


class DrainState(Protocol):
    """What the guards read of the service: whether it drains, and by when the drain must end."""

    draining: bool
    drain_deadline: float | None  # time.monotonic()


# ----- errors -----------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# ----- auth -------------------------------------------------------------------------------------
def load_tokens(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> set[str]:
    """Bearer tokens from a file (one per line, '#' comments) and/or $DIFFUSIONX_TOKENS (comma-separated)."""
    tokens: set[str] = set()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise InvalidInputError(f"tokens file {file} does not exist; write one token per line")
        for line in file.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.add(line)
    raw = (os.environ if env is None else env).get(TOKENS_ENV, "")
    tokens.update(t.strip() for t in raw.split(",") if t.strip())
    for token in tokens:
        if len(token) < 8 or any(c.isspace() for c in token):
            raise InvalidInputError("tokens must be at least 8 characters without spaces")
    return tokens


class Authenticator:
    """Bearer tokens: which requests may refine, and who they are for quotas and idempotency."""

    def __init__(self, tokens: set[str]):
        self.tokens = set(tokens)
        # Compared as UTF-8 bytes: hmac.compare_digest raises on str with non-ASCII characters.
        self._token_bytes = [token.encode("utf-8") for token in self.tokens]

    def identify(self, header: str | None) -> str:
        """The identity behind an `Authorization` header: a hash (the token itself is never stored
        twice); "anonymous" when the server takes no tokens. ApiError 401/403 otherwise."""
        if not self.tokens:
            return "anonymous"
        if not header:
            raise ApiError(
                401, "unauthorized", "missing 'Authorization: Bearer <token>' header", {"WWW-Authenticate": "Bearer"}
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "unauthorized", "the Authorization header must be 'Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        # Starlette decodes header bytes as latin-1; re-encoding gives the bytes the client sent
        # (so a UTF-8 token in the tokens file matches a client sending it as UTF-8).
        raw = token.encode("latin-1", errors="replace")
        matched = False
        for known in self._token_bytes:  # every token compared: the time does not say which one is close
            matched |= hmac.compare_digest(raw, known)
        if not matched:
            raise ApiError(
                403,
                "forbidden",
                f"this token is not accepted by this server; check --tokens / {TOKENS_ENV} on the server",
            )
        return hashlib.sha256(raw).hexdigest()[:16]


def required_tokens(tokens: set[str] | None, insecure: bool) -> set[str]:
    """The tokens a server takes; none only when `insecure` says so explicitly."""
    tokens = set(tokens or ())
    if not tokens and not insecure:
        raise InvalidInputError(
            f"no API tokens: pass --tokens FILE or set {TOKENS_ENV}=token1,token2; or, for local use only, "
            "run with --insecure to accept unauthenticated requests"
        )
    return tokens


# ----- quotas -----------------------------------------------------------------------------------
class Quota:
    """Per-token token bucket (rate) and in-flight counter (concurrency)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._inflight: defaultdict[str, int] = defaultdict(int)

    def acquire(self, who: str, until_one_finishes: Callable[[], float | None]) -> None:
        """Count a request in, or 429. `until_one_finishes()` estimates when one of this token's
        requests in flight is done: the honest Retry-After for a token at its concurrency limit."""
        limits = self.limits
        with self._lock:
            inflight = self._inflight[who]
            if inflight < limits.max_concurrent_per_token:
                rate = limits.rate_per_minute / 60.0
                now = time.monotonic()
                level, last = self._buckets.get(who, (float(limits.burst), now))
                level = min(float(limits.burst), level + (now - last) * rate)
                if level < 1.0:
                    self._buckets[who] = (level, now)
                    raise ApiError(
                        429,
                        "rate_limited",
                        f"rate limit of {limits.rate_per_minute:g} refinements per minute per token reached",
                        retry_after((1.0 - level) / rate if rate > 0 else 60.0),
                    )
                self._buckets[who] = (level - 1.0, now)
                self._inflight[who] += 1
                return
        # At the concurrency limit. Estimated outside the lock: it asks the refiner, whose lock may
        # be held while a future's callbacks (release) run.
        wait = until_one_finishes()
        when = f"one should finish in about {wait:.1f} s" if wait is not None else "no step timed yet"
        raise ApiError(
            429,
            "too_many_concurrent",
            f"this token already has {inflight} refinements in flight (limit {limits.max_concurrent_per_token}); "
            f"wait for one to finish ({when})",
            retry_after(1.0 if wait is None else wait),
        )

    def release(self, who: str) -> None:
        with self._lock:
            self._inflight[who] -= 1


# ----- admission: the p95 target ----------------------------------------------------------------
def admission_refusal(target_s: float | None, wait_s: float, own_s: float) -> ApiError | None:
    """The 429 for a refinement that would break the server's p95 target, or None to admit it.

    The prediction of a refinement sent now, end to end: `wait_s` until it gets a batch slot (the
    refiner's `LoadReport.estimated_wait_s`, its admission simulation of the work already there)
    plus `own_s`, its own expected time in the refiner (its U-Net steps x the recent step time,
    plus the recent refinements' time beyond their U-Net calls). Refused when

        wait_s > 0  and  wait_s + own_s > target_s.

    Refusing every refinement predicted over the target keeps the accepted ones under it as far
    as the prediction holds; the 5% of a p95 is the slack for its errors (a batch that grows
    and steps slower, the HTTP time around the refiner). A refinement that can start at once
    (`wait_s` 0: a free slot, or no step timed yet, so no evidence of a queue) is always admitted:
    the target bounds the queueing the server adds, and a refinement whose own steps alone take
    longer than the target would otherwise be refused for ever.

    Retry-After: the queue ahead drains in real time, so the prediction falls under the target
    after wait_s + own_s - target_s seconds, or, for a refinement longer than the target on its
    own, once a slot is free (after wait_s); rounded up, at least 1. An estimate: others' new
    requests may fill the queue again meanwhile."""
    if target_s is None or not wait_s > 0 or wait_s + own_s <= target_s:
        return None
    predicted = wait_s + own_s
    after = wait_s - max(0.0, target_s - own_s)
    return ApiError(
        429,
        "overloaded",
        f"the server is too busy to answer this refinement within its p95 target of {target_s:g} s: it would "
        f"take about {predicted:.1f} s ({wait_s:.1f} s waiting for a batch slot, {own_s:.1f} s its own); "
        f"retry in about {math.ceil(max(1.0, after))} s",
        retry_after(after),
    )


# ----- the request: headers and body ------------------------------------------------------------
def check_content_type(request: Request) -> None:
    value = request.headers.get("content-type")
    if value is None or value.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be JSON sent with 'Content-Type: application/json' (got {value or 'no Content-Type'})",
        )


def check_idempotency_key(key: str | None) -> None:
    if key is not None and (not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable()):
        raise ApiError(
            400, "bad_idempotency_key", f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters"
        )


async def read_body(request: Request, limit: int, idle_timeout: float, service: DrainState | None = None) -> bytes:
    """The body, at most `limit` bytes, each piece within `idle_timeout` s of the previous one
    (else 408). A drain that starts meanwhile ends the upload with 503 at once: the request would
    be refused anyway, and a slow or stalled upload must not hold the shutdown."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(length) > limit:
            raise ApiError(413, "body_too_large", f"request body is {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    close = {"Connection": "close"}  # the rest of the body is never read
    while True:
        # receive() itself, not request.stream(): a pending receive can be abandoned without
        # losing data, an async generator interrupted mid-await is finished for good
        receive = asyncio.ensure_future(request.receive())
        quiet_since = time.monotonic()
        while not receive.done():
            await asyncio.wait({receive}, timeout=0.25)
            if receive.done():
                break
            if service is not None and service.draining:
                receive.cancel()
                raise draining_error(close)
            if time.monotonic() - quiet_since > idle_timeout:
                receive.cancel()
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body stalled: nothing arrived for {idle_timeout:g} s",
                    close,
                )
        message = receive.result()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes", close)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def validation_message(err: ValidationError) -> tuple[int, str]:
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return 400, "body is not valid JSON: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors)
    if any(e["type"] == "model_type" for e in errors):
        return 400, "body must be a JSON object with the fields prompt, strength, latent or image, ..."
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return 422, "; ".join(parts)


# ----- draining ---------------------------------------------------------------------------------
def draining_error(headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(
        503,
        "draining",
        "the server is shutting down and accepts no new work; retry (another instance) shortly",
        {**retry_after(5), **(headers or {})},
    )


async def within_drain(service: DrainState, future: asyncio.Future) -> Any:
    """`future`'s result, or, if a drain's deadline comes first, 503 `draining` (retry with the
    same Idempotency-Key: the claim is released) while the server can still answer. Neither a
    deadline nor a cancelled handler cancels `future` itself."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        deadline = service.drain_deadline
        if deadline is not None and time.monotonic() >= deadline:
            raise ApiError(
                503,
                "draining",
                "the server is shutting down and this refinement did not finish before its drain deadline; "
                "retry (another instance) with the same Idempotency-Key",
                retry_after(1),
            )

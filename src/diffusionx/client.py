"""The edge's HTTP client for the cloud refinement service (`diffusionx serve`).

`CloudClient` implements the `Refiner` protocol, so `EdgeSession(pair, cloud=CloudClient(url))`
finalizes over HTTP. It

- streams the request body (chunked) and reads the response as a stream with a size cap,
- times out (connect / read separately), and gives up on a request after `deadline` seconds in
  all (attempts and waits together; None: no overall limit),
- retries connection errors, timeouts, 5xx and 429 with exponential backoff and jitter, waiting
  at least the server's Retry-After (`max_backoff` caps the backoff, never Retry-After); when the
  wait would pass the deadline it raises CloudError at once instead of sleeping,
- sends one Idempotency-Key for all attempts of a request, so a retry after a lost response gets
  the first computation's result instead of computing it again,
- raises InvalidInputError with the server's message on 400/413/422 (the request itself is wrong),
  CloudError on anything else (auth, server down, a 200 that is not a readable result, latents
  that are NaN, infinite or out of range); EdgeSession turns the latter into the preview marked
  refined=False.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any, Self

import httpx
from pydantic import ValidationError

from .cloud import RefineRequest, RefineResult, result_problem
from .errors import DiffusionXError, InvalidInputError
from .server.schemas import RefineBody, RefineResponse

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
FINAL_CODES = frozenset({"non_finite_result"})  # 5xx codes the server marks as not worth retrying
CHUNK = 64 * 1024


class CloudError(DiffusionXError):
    """The cloud could not refine: unreachable, overloaded past the retries, or it refused the token."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class CloudClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        deadline: float | None = 300.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        transport: httpx.BaseTransport | None = None,
    ):
        if retries < 0:
            raise InvalidInputError(f"retries must be >= 0, got {retries}")
        if deadline is not None and not deadline > 0:
            raise InvalidInputError(f"deadline must be > 0 seconds (or None), got {deadline}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff  # caps the exponential backoff; Retry-After is honoured in full
        self.deadline = deadline  # seconds for one refine(), all attempts and waits included
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_response_bytes = max_response_bytes
        self.attempts = 0  # HTTP attempts made by this client (for tests and logs)
        headers = {"User-Agent": "diffusionx-edge/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- Refiner ----------------------------------------------------------------------------
    def refine(self, request: RefineRequest, *, idempotency_key: str | None = None) -> RefineResult:
        request.validate()
        try:  # the wire schema the server validates with (server/schemas.py)
            body = RefineBody.from_request(request).model_dump_json(exclude_none=True).encode()
        except ValidationError as err:
            raise InvalidInputError(f"the request does not fit the refine API: {_problems(err)}") from None
        key = idempotency_key or uuid.uuid4().hex
        data = self._post("/v1/refine", body, key)
        return _checked(_result(data))

    # ----- other endpoints --------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """The server's /v1/load report (the load-aware strength policy reads it)."""
        return self._get("/v1/load")

    def health(self) -> dict[str, Any]:
        return self._get("/v1/health")

    def _get(self, path: str) -> dict[str, Any]:
        try:
            response = self._http.get(path)
        except httpx.TransportError as err:
            raise CloudError(f"cloud at {self.base_url} unreachable ({type(err).__name__}: {err})") from None
        if response.status_code != 200:
            raise CloudError(f"GET {path}: {response.status_code} {_message(response.content)}", response.status_code)
        return _json(response.content, f"GET {path}")

    # ----- the retry loop ---------------------------------------------------------------------
    def _post(self, path: str, body: bytes, key: str) -> dict[str, Any]:
        last = "no attempt made"
        end = None if self.deadline is None else time.monotonic() + self.deadline
        for attempt in range(self.retries + 1):
            wait = None
            timeout = httpx.Timeout(self.timeout, connect=self.connect_timeout)
            if end is not None:  # no attempt may outlast the deadline
                left = end - time.monotonic()
                if left <= 0:
                    raise CloudError(
                        f"cloud at {self.base_url}: the request's deadline of {self.deadline:g} s passed after "
                        f"{attempt} attempts; last: {last}"
                    )
                timeout = httpx.Timeout(min(self.timeout, left), connect=min(self.connect_timeout, left))
            self.attempts += 1
            try:
                with self._http.stream(
                    "POST",
                    path,
                    content=_chunks(body),
                    headers={"Content-Type": "application/json", "Idempotency-Key": key},
                    timeout=timeout,
                ) as response:
                    content = self._read(response)
                    status = response.status_code
                    if status == 200:
                        return _json(content, "the cloud's 200 response")
                    message = _message(content)
                    last = f"HTTP {status}: {message}"
                    if status in (400, 413, 415, 422):
                        raise InvalidInputError(f"the cloud rejected the request: {message}")
                    if status not in RETRY_STATUSES or _code(content) in FINAL_CODES:
                        raise CloudError(f"the cloud refused the request (HTTP {status}): {message}", status)
                    wait = _retry_after(response.headers.get("retry-after"))
            except httpx.TransportError as err:  # connect errors, timeouts, dropped connections
                last = f"{type(err).__name__}: {err}"
            if attempt < self.retries:
                delay = min(self.max_backoff, self.backoff * 2**attempt * (0.5 + random.random() / 2))
                pause = max(delay, wait or 0.0)  # at least Retry-After, however long it is
                if end is not None and time.monotonic() + pause > end:
                    why = f"Retry-After: {wait:g} s" if wait is not None and wait >= delay else f"backoff {pause:.2f} s"
                    raise CloudError(
                        f"cloud at {self.base_url}: the next attempt ({why}) would start past the request's deadline "
                        f"of {self.deadline:g} s ({max(0.0, end - time.monotonic()):.1f} s left), so not waiting; "
                        f"last: {last}"
                    )
                time.sleep(pause)
        raise CloudError(f"cloud at {self.base_url} failed after {self.retries + 1} attempts; last: {last}")

    def _read(self, response: httpx.Response) -> bytes:
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise CloudError(f"the cloud's response exceeds {self.max_response_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _result(data: Any) -> RefineResult:
    try:
        return RefineResponse.model_validate(data).to_result()
    except ValidationError as err:
        raise CloudError(f"the cloud's response is not a refinement result ({_problems(err)})") from None
    except ValueError as err:  # the payload is not base64
        raise CloudError(f"the cloud's response is not a refinement result ({type(err).__name__}: {err})") from None


def _problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False))


def _checked(result: RefineResult) -> RefineResult:
    """A 200 whose payload cannot be shown (unreadable, NaN, infinite, absurd) is a failed refinement."""
    problem = result_problem(result)
    if problem is not None:
        raise CloudError(f"the cloud returned {problem}; not showing it")
    return result


def _json(content: bytes, what: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        raise CloudError(f"{what} is not JSON: {content[:200].decode(errors='replace')!r}") from None


def _chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), CHUNK):
        yield body[start : start + CHUNK]


def _message(content: bytes) -> str:
    try:
        return str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return content[:300].decode(errors="replace") or "(empty body)"


def _code(content: bytes) -> str | None:
    try:
        return str(json.loads(content)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110); None if absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None

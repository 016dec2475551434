"""The FastAPI wiring of the refinement service: `create_app(engine_or_refiner, ...)`.

The app is thin: each endpoint runs the guards (guards.py) in the documented order, hands the
request to the `Service` (service.py) and answers with the wire schema (schemas.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import SCHEDULERS
from .config import Limits
from .guards import (
    TOKENS_ENV,
    ApiError,
    check_content_type,
    check_idempotency_key,
    error_response,
    read_body,
    required_tokens,
    retry_after,
    validation_message,
    within_drain,
)
from .schemas import IDEMPOTENCY_KEY_MAX, ErrorResponse, RefineBody, RefineResponse
from .service import Service, as_refiner, default_replica, service_store
from .store import IdempotencyStore

log = logging.getLogger(__name__)


def create_app(
    refiner_or_engine: Any,
    *,
    tokens: set[str] | None = None,
    insecure: bool = False,
    max_batch: int = 8,
    limits: Limits | None = None,
    replica: str | None = None,
    store: IdempotencyStore | str | os.PathLike | None = None,
) -> FastAPI:
    """The service around an Engine (gets a continuous batcher of `max_batch`), a BatchingRefiner,
    or any blocking Refiner (run one at a time). Needs tokens unless `insecure` is explicit.

    `store`: the idempotency store: an `IdempotencyStore` (the caller's: not closed here), or what
    `open_store` takes ("memory", a SQLite file, "redis://host:port/db"); default: in memory."""
    limits = limits or Limits()
    tokens = required_tokens(tokens, insecure)
    store, owns_store = service_store(store, limits)
    service = Service(
        as_refiner(refiner_or_engine, max_batch=max_batch, max_queue=limits.max_queue),
        tokens=tokens,
        insecure=insecure,
        limits=limits,
        replica=replica or default_replica(),
        store=store,
        owns_store=owns_store,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.drain)

    app = FastAPI(
        title="DiffusionX cloud refinement",
        version="1",
        description="Refines an edge preview latent with the cloud model. See docs/serving.md.",
        lifespan=lifespan,
    )
    app.state.service = service
    _install_errors(app, service)
    _install_refine(app, service)
    _install_status(app, service)
    _install_openapi(app, service)
    return app


def _install_errors(app: FastAPI, service: Service) -> None:
    """Every error as the schema's JSON; unexpected ones logged with an id the client sees; the
    request counters and end-to-end latency histogram of /metrics."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(
            422, "invalid_input", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        )

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientDisconnect:  # hung up mid-upload: nobody reads an answer, and it is no 5xx
            service.observe_disconnect(request.url.path)
            return Response(status_code=499)
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("unexpected error on %s %s (error id %s)", request.method, request.url.path, error_id)
            response = error_response(
                500,
                "internal",
                f"internal server error; the server log has the details (error id {error_id})",
                {"X-Error-Id": error_id},
            )
        service.observe(request.url.path, response.status_code, time.perf_counter() - start)
        return response


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "body is not JSON, bad base64, unreadable safetensors or PNG"),
        (401, "no or malformed bearer token"),
        (403, "token not accepted"),
        (408, "the body stalled (nothing arrived for the body timeout)"),
        (413, "body larger than the limit"),
        (415, "Content-Type is not application/json"),
        (422, "a field is out of range, or the latent/image does not fit the cloud model"),
        (429, "per-token concurrency or rate quota, or over the server's p95 target; see Retry-After"),
        (503, "draining or queue full; see Retry-After"),
    )
}


def _install_refine(app: FastAPI, service: Service) -> None:
    """POST /v1/refine: the guards in order (draining, auth, Content-Type, body size and pace,
    draining again), then `_answer`."""
    limits = service.limits

    @app.post(
        "/v1/refine",
        response_model=RefineResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": f"at most {limits.max_body_bytes} bytes",
                "content": {"application/json": {"schema": request_schema(limits)}},
            },
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX},
                    "description": "1-200 printable characters; retries with the same key (per token) return "
                    "the first result, computed once",
                },
            ],
            **({"security": [{"bearer": []}]} if service.tokens else {}),
        },
    )
    async def refine(request: Request):
        service.check_draining()
        who = service.authenticate(request.headers.get("authorization"))
        check_content_type(request)
        raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s, service)
        service.check_draining()  # a body that arrived after the drain began is new work too
        service.active += 1  # (on the event loop: no lock needed)
        try:
            return await _answer(service, request, who, raw)
        finally:
            service.active -= 1


async def _answer(service: Service, request: Request, who: str, raw: bytes) -> JSONResponse:
    """The body parsed by the wire schema, the request checked by the service, then computed
    (or, with an Idempotency-Key, joined or replayed), within the drain's deadline."""
    try:
        body = RefineBody.model_validate_json(raw)
    except ValidationError as err:
        status, message = validation_message(err)
        raise ApiError(status, "bad_request" if status == 400 else "invalid_input", message) from None
    key = request.headers.get("idempotency-key")
    check_idempotency_key(key)
    refine_request = service.to_request(body)
    if key is None:
        outcome, replay = service.compute(who, refine_request, uuid.uuid4().hex), False
    else:
        # off the loop (the store is blocking I/O); it settles even if this client hangs up
        outcome, replay = await within_drain(service, service.begin_async(who, key, refine_request))
    # a client that disconnects does not cancel the work (within_drain never cancels it): its
    # retry picks it up
    answer = await within_drain(service, asyncio.wrap_future(outcome))
    if key is not None:
        answer, from_store = answer
        replay = replay or from_store
    headers = {}
    if replay:
        service.count_replay()
        headers["Idempotent-Replay"] = "true"
    return JSONResponse(answer, headers=headers)


def _install_status(app: FastAPI, service: Service) -> None:
    """GET /v1/health, /v1/load, /metrics."""

    @app.get("/v1/health")
    async def health():
        body = {
            "status": "draining" if service.draining else "ok",
            "model": service.model_name,
            "latent_shape": service.latent_shape,
            "image_size": service.engine.default_size if service.engine is not None else None,
            "schedulers": list(SCHEDULERS),
            "max_batch": service.refiner.max_batch,
            "auth": "bearer" if service.tokens else "none (--insecure)",
            "replica": service.replica,
            "uptime_s": time.time() - service.started,
        }
        alive = getattr(service.refiner, "alive", True)
        if not alive and not service.draining:
            body["status"] = "failed"
            body["reason"] = f"the refiner's worker stopped: {getattr(service.refiner, 'crashed', None)!r}"
        healthy = alive and not service.draining
        return JSONResponse(body, status_code=200 if healthy else 503, headers=None if healthy else retry_after(5))

    @app.get("/v1/load")
    async def load():
        return {**service.load().as_dict(), "replica": service.replica}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        """Prometheus text exposition of this service's own registry (metrics.py)."""
        body, content_type = service.metrics_text()
        return Response(body, media_type=content_type)


def _install_openapi(app: FastAPI, service: Service) -> None:
    def openapi() -> dict[str, Any]:
        """FastAPI's spec plus the bearer scheme (auth is checked in the endpoint, not a dependency)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if service.tokens:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": f"a token from the server's --tokens file or {TOKENS_ENV}",
                    }
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def request_schema(limits: Limits) -> dict[str, Any]:
    """RefineBody's JSON schema with this server's limits, so clients and fuzzers see them."""
    schema = RefineBody.model_json_schema()
    props = schema["properties"]
    props["prompt"].update(minLength=1, maxLength=limits.max_prompt_chars)
    props["steps"]["maximum"] = limits.max_steps
    for field in ("latent", "image"):  # base64 inside a body of at most max_body_bytes
        for option in props[field].get("anyOf", [props[field]]):
            if option.get("type") == "string":
                option["maxLength"] = limits.max_body_bytes
    schema["description"] = (
        f"{schema.get('description', '')} The whole body may be at most {limits.max_body_bytes} bytes."
    ).strip()
    return schema

"""The HTTP refinement service (FastAPI): `create_app(engine_or_refiner, ...)`.

Endpoints (docs/serving.md has the schemas and examples):

- `POST /v1/refine`   JSON body; returns the refined latent (safetensors) or PNG, base64, with timings
- `GET  /v1/health`   liveness/readiness (503 while draining)
- `GET  /v1/load`     queue depth, running batch, recent step time, estimated wait
- `GET  /metrics`     Prometheus exposition (prometheus_client, one registry per app)
- `GET  /openapi.json`

Order of checks on /v1/refine: draining (503) -> auth (401/403) -> Content-Type (415) -> body size
(413, before any parsing, also for chunked bodies) -> JSON and base64 (400) -> fields (422, strict:
no "0.5" or true for numbers) -> idempotent replay -> admission against the p95 target (429, only
with --target-p95) -> quotas (429) -> queue (503). Client data is
parsed only as JSON, safetensors and PNG: never pickle.

The service is these modules; this one is its public entry point and names them:

- `schemas.py`  the wire schema (pydantic models), shared with the client
- `guards.py`   auth (bearer tokens), quotas (rate, concurrency), Content-Type, body size and pace,
                Idempotency-Key, the drain's refusals
- `service.py`  `Service`: the refiner (batching, or one at a time), the request's checks (the
                refine contract's), idempotency through the store, draining, metrics
- `metrics.py`  the Prometheus registry: counters, histograms, the share of the throughput bound
- `routes.py`   the FastAPI wiring: `create_app`
"""

from __future__ import annotations

from .config import Limits
from .guards import TOKENS_ENV, ApiError, load_tokens
from .routes import create_app
from .schemas import ErrorResponse, RefineBody, RefineResponse
from .service import Service, _SerialRefiner, store_settings

__all__ = [
    "TOKENS_ENV",
    "ApiError",
    "ErrorResponse",
    "Limits",
    "RefineBody",
    "RefineResponse",
    "Service",
    "_SerialRefiner",
    "create_app",
    "load_tokens",
    "store_settings",
]

"""The cloud refinement service: HTTP API, continuous step-level batching, Ray Serve scale-out."""

from .._lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__, {".batching": ("BatchingRefiner", "LoadReport", "ServedResult", "ServiceUnavailableError")}
)

__all__ = ["BatchingRefiner", "LoadReport", "ServedResult", "ServiceUnavailableError"]

"""The cloud refinement service: HTTP API, continuous step-level batching, Ray Serve scale-out."""

from .batching import BatchingRefiner, LoadReport, ServedResult, ServiceUnavailableError

__all__ = ["BatchingRefiner", "LoadReport", "ServedResult", "ServiceUnavailableError"]

"""DiffusionX: multi-round text-to-image split between an edge device and the cloud."""

from .errors import (
    DiffusionXError,
    InvalidInputError,
    ModelNotAvailableError,
    OutOfVocabularyWarning,
    PromptTruncatedWarning,
    RoundNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "DiffusionXError",
    "InvalidInputError",
    "ModelNotAvailableError",
    "OutOfVocabularyWarning",
    "PromptTruncatedWarning",
    "RoundNotFoundError",
    "__version__",
]

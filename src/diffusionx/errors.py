"""Exceptions of the public API. The CLI maps InvalidInputError to exit code 2."""


class DiffusionXError(Exception):
    """Base class: every error DiffusionX raises on purpose."""


class InvalidInputError(DiffusionXError, ValueError):
    """The caller passed something unusable; the message says what to change."""


class RoundNotFoundError(InvalidInputError, LookupError):
    """A session was asked for a round it does not have."""


class ModelNotAvailableError(DiffusionXError):
    """Weights are missing or unreadable; the message names them and how to get them."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the tokenizer allows and was cut."""


class OutOfVocabularyWarning(UserWarning):
    """A prompt uses words the embedded world's models never saw (`diffusionx vocab` lists theirs)."""

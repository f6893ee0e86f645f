"""Errors the services raise; `server/api/errors.py` maps each to its HTTP answer."""

from dataclasses import dataclass


@dataclass
class FieldError:
    loc: tuple[str | int, ...]
    msg: str


class InputError(ValueError):
    """Input that is well-formed but unusable (too long for the model's context, ...): HTTP 422."""

    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(e.msg for e in errors))
        self.errors = errors


class NotGranted(PermissionError):
    """The caller's key may not do this (create work for a paid provider it is not granted): HTTP 403."""


class Overloaded(RuntimeError):
    """The batch queue is full: HTTP 503, try again after `retry_after_s`."""

    def __init__(self, model: str, retry_after_s: float):
        super().__init__(f"the {model} model's queue is full; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The request did not finish within REQUEST_TIMEOUT_S: HTTP 504."""


class ModelFailed(RuntimeError):
    """The model raised while computing this item (its batch-mates were not affected): HTTP 500."""


class BlockedPrompt(ValueError):
    """A prompt contains a term of BLOCKED_TERMS: HTTP 400, naming the prompt by its index."""

    def __init__(self, index: int):
        super().__init__(f"prompt {index} contains blocked content")
        self.index = index

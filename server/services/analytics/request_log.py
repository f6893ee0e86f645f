"""One request record per /generate or /predict request, answered or failed, buffered in the record writer (no I/O
on the request path). The service records the requests that reach it; the HTTP layer records, with `refused`, those
turned away before it (schema validation, API key, rate limit, body limits), which it knows from `RequestMark`:
every /generate and /predict request is recorded exactly once."""

import asyncio
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from server.core import clock
from server.db.analytics_models import RequestRecord
from server.services.errors import BlockedPrompt, DeadlineExceeded, InputError, ModelFailed, Overloaded
from server.services.records import RecordWriter

Endpoint = Literal["generate", "predict"]
# The HTTP status `server/api/errors.py` answers for each service error; anything else is a 500.
STATUS_OF_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (InputError, 422),
    (BlockedPrompt, 400),
    (Overloaded, 503),
    (DeadlineExceeded, 504),
    (ModelFailed, 500),
)
CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer (the request was cancelled)
REFUSALS = {401: "Unauthorized", 408: "BodyTimeout", 413: "BodyTooLarge", 422: "InvalidRequest", 429: "RateLimited"}


@dataclass
class RequestMark:
    """Set for each HTTP request by the HTTP layer; the service marks it when it records the request. Mutable, so
    that the mark made in a task the handler spawned is seen by the HTTP layer."""

    recorded: bool = False


REQUEST_MARK: ContextVar[RequestMark | None] = ContextVar("request_mark", default=None)


def status_of(exc: BaseException) -> int:
    if isinstance(exc, asyncio.CancelledError):
        return CLIENT_CLOSED
    return next((status for kind, status in STATUS_OF_ERROR if isinstance(exc, kind)), 500)


@dataclass
class RequestLog:
    recorder: RecordWriter
    endpoint: Endpoint
    model: str

    def answered(
        self, started: float, tenant: str, *, items: int, cached_items: int, tokens_in: int = 0, tokens_out: int = 0
    ) -> None:
        self._add(started, tenant, 200, None, items, cached_items, tokens_in, tokens_out)

    def failed(self, started: float, exc: BaseException, tenant: str) -> None:
        """A request that raised `exc`: it answered no items."""
        self._add(started, tenant, status_of(exc), type(exc).__name__, 0, 0, 0, 0)

    def refused(self, started: float, status: int, tenant: str) -> None:
        """A request answered `status` before it reached the service."""
        self._add(started, tenant, status, REFUSALS.get(status, f"HTTP{status}"), 0, 0, 0, 0)

    def _add(
        self,
        started: float,
        tenant: str,
        status: int,
        error: str | None,
        items: int,
        cached_items: int,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        if (mark := REQUEST_MARK.get()) is not None:
            mark.recorded = True
        self.recorder.add(
            RequestRecord,
            [
                {
                    "id": uuid.uuid4().hex,
                    "tenant": tenant,
                    "endpoint": self.endpoint,
                    "model": self.model,
                    "status": status,
                    "error": error,
                    "items": items,
                    "cached_items": cached_items,
                    "tokens_in": tokens_in,
                    "tokens_out": tokens_out,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                    "created_at": clock.now(),
                }
            ],
        )

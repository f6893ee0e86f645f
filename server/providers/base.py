"""What every provider batch adapter offers, in the server's own vocabulary.

An adapter turns provider-neutral requests into its provider's batch format, submits them (uploading a
file where the API needs one), polls, downloads results (matched on custom_id, never on order), maps the
provider's status vocabulary onto `BatchState`, reads usage, and deletes the provider's files after the
download. It calls its official SDK with the SDK's own retries off: retries and the egress quota are the
caller's (`server/services/offload/calls.py`), so that every attempt passes the quota. SDK errors come out as
`ProviderError`, which says whether a retry can help and after how long.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

Kind = Literal["chat", "embedding", "generate", "predict"]
BatchState = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
]
TERMINAL_STATES: frozenset[BatchState] = frozenset({"completed", "failed", "expired", "cancelled"})
ItemStatus = Literal["succeeded", "failed", "expired", "cancelled"]
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class BatchLimits:
    """The most requests and bytes (of the provider's own input format) one provider batch may hold."""

    max_requests: int
    max_bytes: int


@dataclass(frozen=True)
class NeutralRequest:
    """One request: `body` holds `messages` (chat), `input` (embedding), `prompt` (generate) or `text`
    (predict), plus options such as `max_tokens` and `temperature`."""

    custom_id: str
    body: dict


@dataclass(frozen=True)
class BatchSnapshot:
    """A provider batch as polled; counts are None where the provider does not report them (Gemini)."""

    state: BatchState
    total: int | None = None
    completed: int | None = None
    failed: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class ItemResult:
    custom_id: str
    status: ItemStatus
    output: dict | None
    raw: dict | None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


class ProviderError(Exception):
    """A provider call failed. `status` is the HTTP status (None: no answer, e.g. a timeout)."""

    def __init__(
        self,
        provider: str,
        operation: str,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{provider} {operation} failed: {message}")
        self.provider = provider
        self.operation = operation
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUS


class LookupPending(Exception):
    """The provider cannot tell yet whether it holds the batch of a key (an unrecorded batch that may be it has no
    results yet): neither adopt nor create, ask again later."""


class BatchProvider(Protocol):
    name: str
    limits: BatchLimits

    def line(self, model: str, kind: Kind, request: NeutralRequest) -> bytes:
        """The request as one line of the provider's batch input; its size counts towards `limits.max_bytes`."""

    def wire_ids(self, key: str, custom_ids: Sequence[str]) -> list[str]:
        """The custom_ids the provider is sent for a chunk's requests (in order), and reports its results under."""

    async def upload(self, model: str, kind: Kind, requests: Sequence[NeutralRequest], key: str) -> str | None:
        """Upload the requests where the API needs a file first; the file's id (None: they go inline in `create`).
        An upload creates no batch: repeating it costs nothing but storage."""

    async def create(
        self, model: str, kind: Kind, requests: Sequence[NeutralRequest], source: str | None, key: str
    ) -> str:
        """Create a provider batch carrying `key`, over `source` (from `upload`) or `requests` inline; returns the
        provider's batch id. Never retried blind: the caller looks the key up first (`find`)."""

    async def find(self, key: str, *, since: datetime, count: int, known: Collection[str]) -> str | None:
        """The id of the provider batch created with `key`, if any; None when the provider has none. Raises
        `LookupPending` when it cannot tell yet.

        `since` (shortly before the submission began), `count` (its requests) and `known` (provider batch ids
        already recorded) narrow the scan of a provider that lists batches without their key (Anthropic)."""

    async def poll(self, batch_id: str) -> BatchSnapshot: ...

    async def results(self, batch_id: str) -> list[ItemResult]:
        """Every item's outcome, once the batch is terminal (finished items of an expired batch included)."""

    async def cancel(self, batch_id: str) -> None: ...

    async def cleanup(self, batch_id: str) -> None:
        """Delete the provider-side files of a batch whose results are stored."""

    async def ping(self) -> None:
        """One cheap authenticated call (list one batch): raises `ProviderError` when the API cannot be used."""

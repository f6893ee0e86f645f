"""Anthropic Message Batches adapter (official `anthropic` SDK, `client.messages.batches`).

The requests go inline in the create call. Anthropic's batches carry no metadata, so the chunk's idempotency key
travels in its requests' custom_ids (`<key>-<position>`, mapped back to ours by the worker): `find` recognises a
batch by its own contents, never by its size or age. A batch's requests can only be read in its results, so an
unrecorded batch of the chunk's size whose results are not out yet makes `find` answer `LookupPending` (the chunk
is neither adopted nor created again until that batch has ended). Results are streamed from the batch's results
URL, matched on custom_id.
"""

import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import cast

import anthropic
from anthropic.types.messages.batch_create_params import MessageCreateParamsNonStreaming

from server.providers.base import (
    BatchLimits,
    BatchSnapshot,
    BatchState,
    ItemResult,
    ItemStatus,
    Kind,
    LookupPending,
    NeutralRequest,
)
from server.providers.errors import guarded

STATES: dict[str, BatchState] = {"in_progress": "in_progress", "canceling": "cancelling", "ended": "completed"}
RESULT_STATUS: dict[str | None, ItemStatus] = {
    "succeeded": "succeeded",
    "errored": "failed",
    "canceled": "cancelled",
    "expired": "expired",
}


class AnthropicBatch:
    name = "anthropic"

    def __init__(self, api_key: str, base_url: str | None, limits: BatchLimits, timeout_s: float = 60.0):
        self.client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self.limits = limits

    @staticmethod
    def params(model: str, request: NeutralRequest) -> MessageCreateParamsNonStreaming:
        body = dict(request.body)
        body.setdefault("max_tokens", 1024)
        # A chat request's body is the Messages API's, checked when the job was accepted.
        return cast(MessageCreateParamsNonStreaming, {**body, "model": model})

    def line(self, model: str, kind: Kind, request: NeutralRequest) -> bytes:
        return (
            json.dumps(
                {"custom_id": request.custom_id, "params": self.params(model, request)}, separators=(",", ":")
            ).encode()
            + b","
        )

    def wire_ids(self, key: str, custom_ids: Sequence[str]) -> list[str]:
        return [f"{key}-{position}" for position in range(len(custom_ids))]

    async def upload(self, model: str, kind: Kind, requests: Sequence[NeutralRequest], key: str) -> str | None:
        return None

    async def create(
        self, model: str, kind: Kind, requests: Sequence[NeutralRequest], source: str | None, key: str
    ) -> str:
        batch = await guarded(
            self.name,
            "create",
            lambda: self.client.messages.batches.create(
                requests=[
                    {"custom_id": request.custom_id, "params": self.params(model, request)} for request in requests
                ]
            ),
        )
        return batch.id

    async def find(self, key: str, *, since: datetime, count: int, known: Collection[str]) -> str | None:
        async def carries_key(batch_id: str) -> bool:
            async for entry in await self.client.messages.batches.results(batch_id):
                return entry.custom_id.startswith(f"{key}-")
            return False

        async def scan() -> str | None:
            pending = False
            async for batch in self.client.messages.batches.list(limit=100):
                if batch.created_at < since:
                    break
                counts = batch.request_counts
                total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
                if total != count or batch.id in known:
                    continue
                # The list may lag: a fresh read says whether the batch's results (its custom_ids) can be read.
                if (await self.client.messages.batches.retrieve(batch.id)).processing_status != "ended":
                    pending = True
                elif await carries_key(batch.id):
                    return batch.id
            if pending:
                raise LookupPending(f"an unrecorded batch of {count} requests has not ended yet")
            return None

        return await guarded(self.name, "find", scan)

    async def poll(self, batch_id: str) -> BatchSnapshot:
        batch = await guarded(self.name, "poll", lambda: self.client.messages.batches.retrieve(batch_id))
        counts = batch.request_counts
        total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
        return BatchSnapshot(
            STATES.get(batch.processing_status, "in_progress"),
            total,
            counts.succeeded,
            counts.errored + counts.expired + counts.canceled,
        )

    async def results(self, batch_id: str) -> list[ItemResult]:
        async def download() -> list[ItemResult]:
            return [
                result_of(entry.model_dump(mode="json"))
                async for entry in await self.client.messages.batches.results(batch_id)
            ]

        return await guarded(self.name, "results", download)

    async def cancel(self, batch_id: str) -> None:
        await guarded(self.name, "cancel", lambda: self.client.messages.batches.cancel(batch_id))

    async def ping(self) -> None:
        await guarded(self.name, "ping", lambda: self.client.messages.batches.list(limit=1))

    async def cleanup(self, batch_id: str) -> None:
        await guarded(self.name, "delete", lambda: self.client.messages.batches.delete(batch_id))


def result_of(entry: dict) -> ItemResult:
    result = entry.get("result") or {}
    status = RESULT_STATUS.get(result.get("type"), "failed")
    if status != "succeeded":
        error = (result.get("error") or {}).get("error") or result.get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        return ItemResult(entry["custom_id"], status, None, entry, error=message or result.get("type"))
    message = result.get("message") or {}
    text = "".join(block.get("text", "") for block in message.get("content") or [] if block.get("type") == "text")
    usage = message.get("usage") or {}
    return ItemResult(
        entry["custom_id"],
        "succeeded",
        {"text": text, "finish_reason": message.get("stop_reason")},
        entry,
        input_tokens=usage.get("input_tokens", 0),
        output_tokens=usage.get("output_tokens", 0),
    )

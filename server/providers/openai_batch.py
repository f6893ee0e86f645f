"""OpenAI Batch API adapter (official `openai` SDK): a JSONL file of requests, uploaded, then a batch over it.

The idempotency key travels in the batch's `metadata`; `find` lists recent batches to recover one created
before a crash. Results come as an output file and an error file, matched on custom_id.
"""

import json
import time
from collections.abc import Collection, Sequence
from datetime import datetime
from functools import partial
from typing import Literal

import openai

from server.providers.base import BatchLimits, BatchSnapshot, ItemResult, ItemStatus, Kind, NeutralRequest
from server.providers.errors import guarded

ENDPOINTS: dict[str, Literal["/v1/chat/completions", "/v1/embeddings"]] = {
    "chat": "/v1/chat/completions",
    "embedding": "/v1/embeddings",
}
ERROR_STATUS: dict[str, ItemStatus] = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
KEY_FIELD = "idempotency_key"
# A crashed submission is recovered within the poll interval; older batches need not be scanned.
FIND_WINDOW_S = 48 * 3600


class OpenAIBatch:
    name = "openai"

    def __init__(self, api_key: str, base_url: str | None, limits: BatchLimits, timeout_s: float = 60.0):
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self.limits = limits

    def line(self, model: str, kind: Kind, request: NeutralRequest) -> bytes:
        body = {**request.body, "model": model}
        return (
            json.dumps(
                {"custom_id": request.custom_id, "method": "POST", "url": ENDPOINTS[kind], "body": body},
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )

    def wire_ids(self, key: str, custom_ids: Sequence[str]) -> list[str]:
        return list(custom_ids)

    async def upload(self, model: str, kind: Kind, requests: Sequence[NeutralRequest], key: str) -> str | None:
        content = b"".join(self.line(model, kind, request) for request in requests)
        upload = await guarded(
            self.name,
            "upload",
            lambda: self.client.files.create(file=(f"{key}.jsonl", content, "application/jsonl"), purpose="batch"),
        )
        return upload.id

    async def create(
        self, model: str, kind: Kind, requests: Sequence[NeutralRequest], source: str | None, key: str
    ) -> str:
        assert source is not None, "an OpenAI batch reads the file `upload` returned"
        batch = await guarded(
            self.name,
            "create",
            lambda: self.client.batches.create(
                input_file_id=source, endpoint=ENDPOINTS[kind], completion_window="24h", metadata={KEY_FIELD: key}
            ),
        )
        return batch.id

    async def find(self, key: str, *, since: datetime, count: int, known: Collection[str]) -> str | None:
        async def scan() -> str | None:
            oldest = time.time() - FIND_WINDOW_S
            async for batch in self.client.batches.list(limit=100):
                if (batch.metadata or {}).get(KEY_FIELD) == key:
                    return batch.id
                if batch.created_at < oldest:
                    return None
            return None

        return await guarded(self.name, "find", scan)

    async def poll(self, batch_id: str) -> BatchSnapshot:
        batch = await guarded(self.name, "poll", lambda: self.client.batches.retrieve(batch_id))
        counts = batch.request_counts
        errors = "; ".join(e.message or e.code or "" for e in (batch.errors.data if batch.errors else None) or [])
        return BatchSnapshot(
            batch.status,
            counts.total if counts else None,
            counts.completed if counts else None,
            counts.failed if counts else None,
            errors or None,
        )

    async def _lines(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        content = await guarded(self.name, "download", lambda: self.client.files.content(file_id))
        return [json.loads(line) for line in content.text.splitlines() if line.strip()]

    async def results(self, batch_id: str) -> list[ItemResult]:
        batch = await guarded(self.name, "poll", lambda: self.client.batches.retrieve(batch_id))
        lines = await self._lines(batch.output_file_id) + await self._lines(batch.error_file_id)
        return [result_of(line) for line in lines]

    async def cancel(self, batch_id: str) -> None:
        await guarded(self.name, "cancel", lambda: self.client.batches.cancel(batch_id))

    async def ping(self) -> None:
        await guarded(self.name, "ping", lambda: self.client.batches.list(limit=1))

    async def cleanup(self, batch_id: str) -> None:
        batch = await guarded(self.name, "poll", lambda: self.client.batches.retrieve(batch_id))
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
            if file_id:
                await guarded(self.name, "delete", partial(self.client.files.delete, file_id))


def output_of(body: dict) -> dict:
    if body.get("object") == "list" and body.get("data"):
        return {"embedding": body["data"][0].get("embedding")}
    choice = (body.get("choices") or [{}])[0]
    return {"text": (choice.get("message") or {}).get("content"), "finish_reason": choice.get("finish_reason")}


def result_of(line: dict) -> ItemResult:
    custom_id = line["custom_id"]
    response, error = line.get("response"), line.get("error")
    body = (response or {}).get("body") or {}
    usage = body.get("usage") or {}
    tokens = {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}
    if response and response.get("status_code") == 200:
        return ItemResult(custom_id, "succeeded", output_of(body), line, **tokens)
    error = error or body.get("error") or {}
    code = error.get("code") or ""
    status = ERROR_STATUS.get(code, "failed")
    message = error.get("message") or f"HTTP {(response or {}).get('status_code')}"
    return ItemResult(custom_id, status, None, line, error=f"{code}: {message}" if code else message, **tokens)

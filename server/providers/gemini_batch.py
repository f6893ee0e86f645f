"""Gemini Batch Mode adapter (official `google-genai` SDK, `client.aio.batches`).

Requests go inline while the batch stays under `INLINE_LIMIT_BYTES` (the API takes inline batches under
20 MB), else as an uploaded JSONL file. The idempotency key is the batch's display name, so `find` lists
batches to recover one created before a crash. Each request carries its custom_id (inline: `metadata`,
file: `key`) and results are matched on it. The SDK shows the server's BATCH_STATE_* as JOB_STATE_*;
EXPIRED is terminal.
"""

import io
import json
from collections.abc import Collection, Sequence
from datetime import datetime
from functools import partial
from typing import cast

from google import genai
from google.genai import types

from server.providers.base import BatchLimits, BatchSnapshot, BatchState, ItemResult, Kind, NeutralRequest
from server.providers.errors import guarded

INLINE_LIMIT_BYTES = 19 * 1024 * 1024
STATES: dict[str, BatchState] = {
    "JOB_STATE_QUEUED": "validating",
    "JOB_STATE_PENDING": "validating",
    "JOB_STATE_UNSPECIFIED": "validating",
    "JOB_STATE_RUNNING": "in_progress",
    "JOB_STATE_PAUSED": "in_progress",
    "JOB_STATE_UPDATING": "in_progress",
    "JOB_STATE_SUCCEEDED": "completed",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "completed",
    "JOB_STATE_FAILED": "failed",
    "JOB_STATE_CANCELLING": "cancelling",
    "JOB_STATE_CANCELLED": "cancelled",
    "JOB_STATE_EXPIRED": "expired",
}
ROLES = {"user": "user", "assistant": "model", "model": "model"}


def request_of(body: dict) -> dict:
    """A neutral chat body (`messages`, `max_tokens`, `temperature`, `top_p`) as a GenerateContentRequest (REST)."""
    contents, system = [], []
    for message in body["messages"]:
        if message.get("role") == "system":
            system.append({"text": message["content"]})
        else:
            contents.append({"role": ROLES.get(message.get("role"), "user"), "parts": [{"text": message["content"]}]})
    generation = {
        name: body[key]
        for key, name in (("max_tokens", "maxOutputTokens"), ("temperature", "temperature"), ("top_p", "topP"))
        if key in body
    }
    request: dict = {"contents": contents}
    if generation:
        request["generationConfig"] = generation
    if system:
        request["systemInstruction"] = {"parts": system}
    return request


def inlined(custom_id: str, request: dict) -> types.InlinedRequest:
    generation = request.get("generationConfig", {})
    config = types.GenerateContentConfig(
        max_output_tokens=generation.get("maxOutputTokens"),
        temperature=generation.get("temperature"),
        top_p=generation.get("topP"),
        system_instruction=request["systemInstruction"]["parts"][0]["text"] if "systemInstruction" in request else None,
    )
    return types.InlinedRequest(contents=request["contents"], metadata={"key": custom_id}, config=config)


class GeminiBatch:
    name = "gemini"

    def __init__(self, api_key: str, base_url: str | None, limits: BatchLimits, timeout_s: float = 60.0):
        options = types.HttpOptions(base_url=base_url, timeout=int(timeout_s * 1000))
        self.client = genai.Client(api_key=api_key, http_options=options)
        self.limits = limits

    def line(self, model: str, kind: Kind, request: NeutralRequest) -> bytes:
        return (
            json.dumps({"key": request.custom_id, "request": request_of(request.body)}, separators=(",", ":")).encode()
            + b"\n"
        )

    def wire_ids(self, key: str, custom_ids: Sequence[str]) -> list[str]:
        return list(custom_ids)

    async def upload(self, model: str, kind: Kind, requests: Sequence[NeutralRequest], key: str) -> str | None:
        lines = [self.line(model, kind, request) for request in requests]
        if sum(map(len, lines)) < INLINE_LIMIT_BYTES:
            return None
        upload = await guarded(
            self.name,
            "upload",
            lambda: self.client.aio.files.upload(
                file=io.BytesIO(b"".join(lines)),
                config=types.UploadFileConfig(mime_type="application/jsonl", display_name=key),
            ),
        )
        return upload.name

    async def create(
        self, model: str, kind: Kind, requests: Sequence[NeutralRequest], source: str | None, key: str
    ) -> str:
        src = source or [inlined(r.custom_id, request_of(r.body)) for r in requests]
        batch = await guarded(
            self.name,
            "create",
            lambda: self.client.aio.batches.create(
                model=model, src=src, config=types.CreateBatchJobConfig(display_name=key)
            ),
        )
        # The SDK types every field of its models optional; a created batch always has its name.
        return cast(str, batch.name)

    async def find(self, key: str, *, since: datetime, count: int, known: Collection[str]) -> str | None:
        async def scan() -> str | None:
            async for batch in await self.client.aio.batches.list(config=types.ListBatchJobsConfig(page_size=100)):
                if batch.display_name == key:
                    return batch.name
            return None

        return await guarded(self.name, "find", scan)

    async def poll(self, batch_id: str) -> BatchSnapshot:
        batch = await guarded(self.name, "poll", lambda: self.client.aio.batches.get(name=batch_id))
        state = batch.state.value if batch.state else "JOB_STATE_UNSPECIFIED"
        return BatchSnapshot(STATES.get(state, "in_progress"), error=batch.error.message if batch.error else None)

    async def results(self, batch_id: str) -> list[ItemResult]:
        batch = await guarded(self.name, "poll", lambda: self.client.aio.batches.get(name=batch_id))
        dest = batch.dest
        if dest is None:
            return []
        if dest.inlined_responses:
            return [inline_result(entry) for entry in dest.inlined_responses]
        if dest.file_name:
            content = await guarded(self.name, "download", partial(self.client.aio.files.download, file=dest.file_name))
            return [file_result(json.loads(line)) for line in content.decode().splitlines() if line.strip()]
        return []

    async def cancel(self, batch_id: str) -> None:
        await guarded(self.name, "cancel", lambda: self.client.aio.batches.cancel(name=batch_id))

    async def ping(self) -> None:
        await guarded(
            self.name, "ping", lambda: self.client.aio.batches.list(config=types.ListBatchJobsConfig(page_size=1))
        )

    async def cleanup(self, batch_id: str) -> None:
        batch = await guarded(self.name, "poll", lambda: self.client.aio.batches.get(name=batch_id))
        names = [batch.src.file_name if batch.src else None, batch.dest.file_name if batch.dest else None]
        for name in filter(None, names):
            await guarded(self.name, "delete", partial(self.client.aio.files.delete, name=name))


def _success(custom_id: str, response: dict, raw: dict) -> ItemResult:
    candidate = (response.get("candidates") or [{}])[0]
    text = "".join(part.get("text", "") for part in (candidate.get("content") or {}).get("parts") or [])
    usage = response.get("usageMetadata") or response.get("usage_metadata") or {}
    return ItemResult(
        custom_id,
        "succeeded",
        {"text": text, "finish_reason": candidate.get("finishReason") or candidate.get("finish_reason")},
        raw,
        input_tokens=usage.get("promptTokenCount") or usage.get("prompt_token_count") or 0,
        output_tokens=usage.get("candidatesTokenCount") or usage.get("candidates_token_count") or 0,
    )


def inline_result(entry: types.InlinedResponse) -> ItemResult:
    custom_id = (entry.metadata or {}).get("key", "")
    raw = entry.model_dump(mode="json", exclude_none=True)
    if entry.error is not None or entry.response is None:
        return ItemResult(custom_id, "failed", None, raw, error=entry.error.message if entry.error else "no response")
    return _success(custom_id, entry.response.model_dump(mode="json", exclude_none=True), raw)


def file_result(line: dict) -> ItemResult:
    if "response" not in line:
        error = line.get("error") or {}
        return ItemResult(line.get("key", ""), "failed", None, line, error=error.get("message") or "no response")
    return _success(line.get("key", ""), line["response"], line)

"""A fake Anthropic Message Batches API (and real-time Messages) in the wire format the official `anthropic` SDK
sends and parses. Point the SDK at it with `Anthropic(base_url=fake.base_url, api_key=...)` (no /v1: the SDK adds it).

An ended batch's `results_url` is absolute and points back at the fake, as the SDK's `results()` follows it. Result
types are succeeded / errored / canceled / expired. The Message Batches API has no failed state: a batch the
settings fail as a whole ends with every request errored (api_error). Answers read `answer to <custom_id>`."""

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.behaviour import BatchBehaviour, Lifecycle
from tests.fakes.serving import FakeServer, json_lines, rfc3339

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_BATCH_FAILURE = {"type": "api_error", "message": "Internal server error."}


def _error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "error": {"type": error_type, "message": message}}, status_code=status, headers=headers
    )


def _message_text(messages: list[dict[str, Any]]) -> str:
    content = messages[-1].get("content", "") if messages else ""
    if isinstance(content, list):
        return " ".join(block.get("text", "") for block in content if isinstance(block, dict))
    return str(content)


@dataclass
class _Batch:
    id: str
    params: dict[str, dict[str, Any]]
    lifecycle: Lifecycle
    created_at: float = field(default_factory=time.time)
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


class FakeAnthropic(FakeServer):
    """Fake Anthropic API. `settings` holds the knobs (see BatchBehaviour); `batches_created` counts accepted ones."""

    def __init__(self, settings: BatchBehaviour | None = None) -> None:
        super().__init__()
        self.settings = settings or BatchBehaviour()
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self.batches_created = 0

    def routes(self) -> list[Route]:
        return [
            self.route("/v1/messages/batches", self._create_batch, "POST"),
            self.route("/v1/messages/batches", self._list_batches, "GET"),
            self.route("/v1/messages/batches/{batch_id}", self._retrieve_batch, "GET"),
            self.route("/v1/messages/batches/{batch_id}", self._delete_batch, "DELETE"),
            self.route("/v1/messages/batches/{batch_id}/cancel", self._cancel_batch, "POST"),
            self.route("/v1/messages/batches/{batch_id}/results", self._results, "GET"),
            self.route("/v1/messages", self._message, "POST"),
        ]

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):024x}"

    def _body(self, batch: _Batch) -> dict[str, Any]:
        lifecycle = batch.lifecycle
        ended = lifecycle.outcome is not None
        counts = {
            "processing": 0 if ended else len(lifecycle.keys),
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        }
        for result in batch.results:
            counts[result["result"]["type"]] += 1
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "canceling" if lifecycle.cancel_requested else "in_progress",
            "request_counts": counts,
            "created_at": rfc3339(batch.created_at),
            "expires_at": rfc3339(batch.created_at + 24 * 3600),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(batch.cancel_initiated_at) if batch.cancel_initiated_at else None,
            "ended_at": rfc3339(batch.ended_at) if batch.ended_at else None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    def _batch(self, batch_id: str) -> _Batch | JSONResponse:
        found = self._batches.get(batch_id)
        return found if found else _error(404, "not_found_error", f"No batch found with id {batch_id}.")

    async def _create_batch(self, request: Request) -> Response:
        requests = json.loads(await request.body()).get("requests") or []
        with self.lock:
            fault = self.settings.take_create_fault()
            if retry_after := self.settings.refusal(fault):
                return _error(
                    429,
                    "rate_limit_error",
                    "Number of requests has exceeded your rate limit.",
                    {"retry-after": retry_after},
                )
            params: dict[str, dict[str, Any]] = {}
            for index, item in enumerate(requests):
                custom_id = item.get("custom_id", "")
                if not CUSTOM_ID.fullmatch(custom_id):
                    return _error(
                        400,
                        "invalid_request_error",
                        f"requests.{index}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'",
                    )
                if custom_id in params:
                    return _error(400, "invalid_request_error", f"Duplicate custom_id {custom_id}.")
                missing = {"model", "max_tokens", "messages"} - set(item.get("params", {}))
                if missing:
                    return _error(400, "invalid_request_error", f"requests.{index}.params: missing {sorted(missing)}")
                params[custom_id] = item["params"]
            if not params:
                return _error(400, "invalid_request_error", "requests: at least one request is required.")
            self.batches_created += 1
            batch = _Batch(self._new_id("msgbatch_"), params, Lifecycle(self.batches_created, list(params)))
            self._batches[batch.id] = batch
            answer = JSONResponse(self._body(batch))
        return await self.answer_created(fault, answer)

    async def _retrieve_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            if batch.lifecycle.outcome is None:
                batch.lifecycle.poll(self.settings)
                if batch.lifecycle.outcome is not None:
                    self._finish(batch)
            return JSONResponse(self._body(batch))

    def _finish(self, batch: _Batch) -> None:
        lifecycle, settings = batch.lifecycle, self.settings
        batch.ended_at = time.time()
        if lifecycle.outcome == "failed":
            batch.results = [_errored(key, _BATCH_FAILURE) for key in lifecycle.keys]
            return
        undone = "canceled" if lifecycle.outcome == "cancelled" else "expired"
        failing = {
            key
            for key in lifecycle.done_keys
            if settings.fail_item(key) or settings.fail_item(_message_text(batch.params[key]["messages"]))
        }
        batch.results = settings.ordered(
            [
                _errored(key, {"type": "invalid_request_error", "message": f"The fake was told to fail {key}."})
                if key in failing
                else self._succeeded(key, batch.params[key])
                for key in lifecycle.done_keys
            ]
            + [{"custom_id": key, "result": {"type": undone}} for key in lifecycle.undone_keys]
        )

    def _succeeded(self, custom_id: str, params: dict[str, Any]) -> dict[str, Any]:
        message = _message_body(self._new_id("msg_"), f"answer to {custom_id}", params, self.settings, "batch")
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}

    async def _results(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            if batch.lifecycle.outcome is None:
                return _error(404, "not_found_error", f"Results for {batch.id} are not available yet.")
            return Response(json_lines(batch.results), media_type="application/x-jsonl")

    async def _list_batches(self, request: Request) -> Response:
        query = request.query_params
        limit = int(query.get("limit", 20))
        if not 1 <= limit <= 1000:
            return _error(400, "invalid_request_error", "limit: must be between 1 and 1000.")
        with self.lock:
            newest_first = list(reversed(self._batches.values()))
            ids = [batch.id for batch in newest_first]
            if query.get("before_id") in ids:
                end = ids.index(query["before_id"])
                start = max(0, end - limit)
                has_more = start > 0
            else:
                start = ids.index(query["after_id"]) + 1 if query.get("after_id") in ids else 0
                end = start + limit
                has_more = end < len(ids)
            page = newest_first[start:end]
            return JSONResponse(
                {
                    "data": [self._body(batch) for batch in page],
                    "has_more": has_more,
                    "first_id": page[0].id if page else None,
                    "last_id": page[-1].id if page else None,
                }
            )

    async def _cancel_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            if batch.lifecycle.outcome is None and not batch.lifecycle.cancel_requested:
                batch.lifecycle.cancel_requested = True
                batch.cancel_initiated_at = time.time()
            return JSONResponse(self._body(batch))

    async def _delete_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            if batch.lifecycle.outcome is None:
                return _error(
                    400,
                    "invalid_request_error",
                    f"Batch {batch.id} cannot be deleted while it is processing; cancel it first.",
                )
            del self._batches[batch.id]
            return JSONResponse({"id": batch.id, "type": "message_batch_deleted"})

    async def _message(self, request: Request) -> Response:
        params = json.loads(await request.body())
        with self.lock:
            message_id = self._new_id("msg_")
        text = f"answer to {_message_text(params.get('messages', []))}"
        return JSONResponse(_message_body(message_id, text, params, self.settings, "standard"))


def _errored(custom_id: str, error: dict[str, str]) -> dict[str, Any]:
    return {"custom_id": custom_id, "result": {"type": "errored", "error": {"type": "error", "error": error}}}


def _message_body(
    message_id: str, text: str, params: dict[str, Any], settings: BatchBehaviour, service_tier: str
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": params.get("model", "unknown"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": settings.input_tokens,
            "output_tokens": settings.output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": service_tier,
        },
    }

"""A fake OpenAI Files + Batch API (and real-time chat completions and embeddings) in the wire format the official
`openai` SDK sends and parses. Point the SDK at it with `OpenAI(base_url=f"{fake.base_url}/v1", api_key=...)`.

Batch outputs follow the real service: successes go to the output file, per-request failures (HTTP 400 bodies) and
expired or cancelled requests (`error.code` batch_expired / batch_cancelled) to the error file; a file that would be
empty is not created. A batch answer's text is `answer to <custom_id>`; an embedding is `embedding_for(input)`."""

import base64
import hashlib
import itertools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.behaviour import BatchBehaviour, Lifecycle
from tests.fakes.serving import FakeServer, json_lines, parse_multipart, unix_now

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
EMBEDDING_DIMENSIONS = 8
_UNFINISHED_REASONS = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}


def embedding_for(text: str) -> list[float]:
    """The fake's deterministic embedding of a text: float32-exact values in [-1, 1)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [struct.unpack("<f", struct.pack("<f", byte / 128 - 1))[0] for byte in digest[:EMBEDDING_DIMENSIONS]]


def _error(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _message_text(messages: list[dict[str, Any]]) -> str:
    content = messages[-1].get("content", "") if messages else ""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int = field(default_factory=unix_now)

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    lines: dict[str, dict[str, Any]]
    lifecycle: Lifecycle
    validation_errors: list[dict[str, Any]]
    created_at: int = field(default_factory=unix_now)
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    usage: dict[str, Any] | None = None
    errors: list[dict[str, Any]] | None = None

    @property
    def status(self) -> str:
        outcome = self.lifecycle.outcome
        if outcome is not None:
            return outcome
        if self.lifecycle.cancel_requested:
            return "cancelling"
        return "in_progress" if self.lifecycle.polls else "validating"

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            **{
                f"{name}_at": self.times.get(name)
                for name in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
            },
            "request_counts": self.counts,
            "metadata": self.metadata,
            "model": self._model(),
            "usage": self.usage,
        }

    def _model(self) -> str | None:
        models = {line.get("body", {}).get("model") for line in self.lines.values()}
        return next(iter(models)) if len(models) == 1 else None


class FakeOpenAI(FakeServer):
    """Fake OpenAI API. `settings` holds the knobs (see BatchBehaviour); `batches_created` counts accepted batches."""

    def __init__(self, settings: BatchBehaviour | None = None) -> None:
        super().__init__()
        self.settings = settings or BatchBehaviour()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self.batches_created = 0

    def file_ids(self) -> set[str]:
        """Ids of the files that exist now (uploads and batch outputs not deleted yet)."""
        with self.lock:
            return set(self._files)

    def batched_custom_ids(self) -> list[str]:
        """The custom_id of every request of every accepted batch (one entry per request)."""
        with self.lock:
            return [custom_id for batch in self._batches.values() for custom_id in batch.lines]

    def routes(self) -> list[Route]:
        return [
            self.route("/v1/files", self._upload_file, "POST"),
            self.route("/v1/files/{file_id}", self._get_file, "GET"),
            self.route("/v1/files/{file_id}/content", self._file_content, "GET"),
            self.route("/v1/files/{file_id}", self._delete_file, "DELETE"),
            self.route("/v1/batches", self._create_batch, "POST"),
            self.route("/v1/batches", self._list_batches, "GET"),
            self.route("/v1/batches/{batch_id}", self._retrieve_batch, "GET"),
            self.route("/v1/batches/{batch_id}/cancel", self._cancel_batch, "POST"),
            self.route("/v1/chat/completions", self._chat_completion, "POST"),
            self.route("/v1/embeddings", self._embeddings, "POST"),
        ]

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):024x}"

    async def _upload_file(self, request: Request) -> Response:
        fields = parse_multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in fields or "purpose" not in fields:
            return _error(400, "Missing required parameter: 'file' and 'purpose'.", param="file")
        filename, content = fields["file"]
        with self.lock:
            uploaded = _File(self._new_id("file-"), filename or "upload", fields["purpose"][1].decode(), content)
            self._files[uploaded.id] = uploaded
            answer = uploaded.body()
        await self.hold("upload")
        return JSONResponse(answer)

    def _file(self, file_id: str) -> _File | JSONResponse:
        found = self._files.get(file_id)
        return found if found else _error(404, f"No such File object: {file_id}", param="id")

    async def _get_file(self, request: Request) -> Response:
        with self.lock:
            found = self._file(request.path_params["file_id"])
            return found if isinstance(found, Response) else JSONResponse(found.body())

    async def _file_content(self, request: Request) -> Response:
        await self.hold("results")
        with self.lock:
            found = self._file(request.path_params["file_id"])
            return (
                found if isinstance(found, Response) else Response(found.content, media_type="application/octet-stream")
            )

    async def _delete_file(self, request: Request) -> Response:
        with self.lock:
            found = self._file(request.path_params["file_id"])
            if isinstance(found, Response):
                return found
            del self._files[found.id]
            return JSONResponse({"id": found.id, "object": "file", "deleted": True})

    async def _create_batch(self, request: Request) -> Response:
        body = json.loads(await request.body())
        with self.lock:
            fault = self.settings.take_create_fault()
            if retry_after := self.settings.refusal(fault):
                return _error(
                    429,
                    "Rate limit reached for batch creation. Please try again later.",
                    error_type="requests",
                    code="rate_limit_exceeded",
                    headers={"retry-after": retry_after},
                )
            endpoint = body.get("endpoint")
            if endpoint not in ENDPOINTS:
                return _error(400, f"The fake supports the endpoints {ENDPOINTS}, not {endpoint!r}.", param="endpoint")
            if body.get("completion_window") != "24h":
                return _error(400, "Invalid 'completion_window': only '24h' is supported.", param="completion_window")
            if len(body.get("metadata") or {}) > 16:
                return _error(400, "Invalid 'metadata': at most 16 pairs.", param="metadata")
            input_file = self._file(body.get("input_file_id", ""))
            if isinstance(input_file, Response):
                return input_file
            lines, problems = _parse_input(input_file.content, endpoint)
            self.batches_created += 1
            batch = _Batch(
                self._new_id("batch_"),
                endpoint,
                input_file.id,
                "24h",
                body.get("metadata"),
                lines,
                Lifecycle(self.batches_created, list(lines), invalid=bool(problems)),
                problems,
            )
            batch.counts["total"] = len(lines)
            self._batches[batch.id] = batch
            answer = batch.body()
        return await self.answer_created(fault, JSONResponse(answer))

    async def _retrieve_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batches.get(request.path_params["batch_id"])
            if batch is None:
                return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.")
            was_running = batch.lifecycle.outcome is None
            batch.lifecycle.poll(self.settings)
            now = unix_now()
            if not batch.lifecycle.invalid:
                batch.times.setdefault("in_progress", now)
            if was_running and batch.lifecycle.outcome is not None:
                self._finish(batch, now)
            answer = batch.body()
        await self.hold("poll")
        return JSONResponse(answer)

    def _finish(self, batch: _Batch, now: int) -> None:
        lifecycle, settings = batch.lifecycle, self.settings
        batch.times[lifecycle.outcome] = now
        if lifecycle.outcome == "failed":
            batch.errors = batch.validation_errors or [
                {
                    "code": "token_limit_exceeded",
                    "line": None,
                    "param": None,
                    "message": "Enqueued token limit reached for this model in your organization. Try again later.",
                }
            ]
            return
        batch.times["finalizing"] = now
        outputs = [
            _output_line(key, batch.lines[key], batch.endpoint, settings, self._new_id)
            for key in lifecycle.succeeded(settings)
        ]
        failures = [_failure_line(key, self._new_id) for key in lifecycle.errored(settings)]
        if lifecycle.outcome in _UNFINISHED_REASONS:
            code, message = _UNFINISHED_REASONS[lifecycle.outcome]
            failures += [
                {
                    "id": self._new_id("batch_req_"),
                    "custom_id": key,
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                for key in lifecycle.undone_keys
            ]
        batch.output_file_id = self._store_output(batch, "output", settings.ordered(outputs))
        batch.error_file_id = self._store_output(batch, "error", settings.ordered(failures))
        batch.counts.update(completed=len(outputs), failed=len(failures))
        if outputs:
            usages = [line["response"]["body"]["usage"] for line in outputs]
            prompt = sum(usage["prompt_tokens"] for usage in usages)
            completion = sum(usage.get("completion_tokens", 0) for usage in usages)
            batch.usage = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }

    def _store_output(self, batch: _Batch, kind: str, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        stored = _File(self._new_id("file-"), f"{batch.id}_{kind}.jsonl", "batch_output", json_lines(lines))
        self._files[stored.id] = stored
        return stored.id

    async def _list_batches(self, request: Request) -> Response:
        limit = int(request.query_params.get("limit", 20))
        if not 1 <= limit <= 100:
            return _error(400, "Invalid 'limit': must be between 1 and 100.", param="limit")
        with self.lock:
            newest_first = list(reversed(self._batches.values()))
            after = request.query_params.get("after")
            ids = [batch.id for batch in newest_first]
            start = ids.index(after) + 1 if after in ids else 0
            page = newest_first[start : start + limit]
            return JSONResponse(
                {
                    "object": "list",
                    "data": [batch.body() for batch in page],
                    "first_id": page[0].id if page else None,
                    "last_id": page[-1].id if page else None,
                    "has_more": start + limit < len(newest_first),
                }
            )

    async def _cancel_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batches.get(request.path_params["batch_id"])
            if batch is None:
                return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.")
            if batch.lifecycle.outcome is not None:
                return _error(400, f"Cannot cancel a batch with status '{batch.status}'.")
            batch.lifecycle.cancel_requested = True
            batch.times.setdefault("cancelling", unix_now())
            return JSONResponse(batch.body())

    async def _chat_completion(self, request: Request) -> Response:
        body = json.loads(await request.body())
        return JSONResponse(
            _chat_body(
                f"answer to {_message_text(body.get('messages', []))}", body, self.settings, self._new_id("chatcmpl-")
            )
        )

    async def _embeddings(self, request: Request) -> Response:
        body = json.loads(await request.body())
        encoded = _embeddings_body(body, self.settings)
        if body.get("encoding_format") == "base64":
            for item in encoded["data"]:
                item["embedding"] = base64.b64encode(
                    struct.pack(f"<{len(item['embedding'])}f", *item["embedding"])
                ).decode()
        return JSONResponse(encoded)


def _parse_input(content: bytes, endpoint: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The requests of an input file by custom_id, and the validation errors the real service reports for it."""
    lines: dict[str, dict[str, Any]] = {}
    problems: list[dict[str, Any]] = []
    models: set[str] = set()

    def problem(code: str, number: int, message: str) -> None:
        problems.append({"code": code, "line": number, "message": message, "param": None})

    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            problem("invalid_json_line", number, "This line is not parseable as valid JSON.")
            continue
        if line.get("url") != endpoint:
            problem("url_mismatch", number, f"The url of this line does not match the batch endpoint {endpoint}.")
        models.add(line.get("body", {}).get("model"))
        if len(models) > 1:
            problem("model_mismatch", number, "All requests of a batch must use the same model.")
        if line.get("custom_id") in lines:
            problem("duplicate_custom_id", number, "The custom_id of this line is used more than once.")
        lines[line.get("custom_id")] = line
    if not lines and not problems:
        problem("empty_file", 0, "The input file is empty.")
    return lines, problems


def _output_line(
    custom_id: str, line: dict[str, Any], endpoint: str, settings: BatchBehaviour, new_id: Callable[[str], str]
) -> dict[str, Any]:
    request_body = line.get("body", {})
    if endpoint == "/v1/embeddings":
        response_body = _embeddings_body(request_body, settings)
    else:
        response_body = _chat_body(f"answer to {custom_id}", request_body, settings, new_id("chatcmpl-"))
    return {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "error": None,
        "response": {"status_code": 200, "request_id": new_id("req_"), "body": response_body},
    }


def _failure_line(custom_id: str, new_id: Callable[[str], str]) -> dict[str, Any]:
    body = {
        "error": {
            "message": f"The fake was told to fail request {custom_id}.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    return {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "error": None,
        "response": {"status_code": 400, "request_id": new_id("req_"), "body": body},
    }


def _chat_body(text: str, request_body: dict[str, Any], settings: BatchBehaviour, completion_id: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": request_body.get("model", "unknown"),
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": text, "refusal": None},
            }
        ],
        "usage": {
            "prompt_tokens": settings.input_tokens,
            "completion_tokens": settings.output_tokens,
            "total_tokens": settings.input_tokens + settings.output_tokens,
        },
    }


def _embeddings_body(request_body: dict[str, Any], settings: BatchBehaviour) -> dict[str, Any]:
    inputs = request_body.get("input", "")
    texts = [inputs] if isinstance(inputs, str) else [str(text) for text in inputs]
    tokens = settings.input_tokens * len(texts)
    return {
        "object": "list",
        "model": request_body.get("model", "unknown"),
        "data": [
            {"object": "embedding", "index": index, "embedding": embedding_for(text)}
            for index, text in enumerate(texts)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }

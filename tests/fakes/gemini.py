"""A fake Gemini API (v1beta): Batch Mode, the Files API with resumable uploads, and `generateContent` with
structured output, in the wire format the official `google-genai` SDK sends and parses. Point the SDK at it with
`genai.Client(api_key=..., http_options=types.HttpOptions(base_url=fake.base_url))`.

Batches are long-running Operations whose `metadata.state` is BATCH_STATE_* (the SDK shows JOB_STATE_*). A finished
batch carries its output twice, as the service does: in `metadata.output` (what the SDK reads) and in `response`.
Inline batches answer with `inlinedResponses` (metadata echoed), file batches with a generated `responsesFile` of
`{"key", "response" | "error"}` lines. As documented for the service, an expired or cancelled batch has no results.
Batch answers read `answer to <key>` (the inline request's metadata `key`, else its index)."""

import base64
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.behaviour import BatchBehaviour, Lifecycle
from tests.fakes.serving import FakeServer, json_lines, rfc3339

_STATES = {
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "expired": "BATCH_STATE_EXPIRED",
    "cancelled": "BATCH_STATE_CANCELLED",
}
_TYPE_PREFIX = "type.googleapis.com/google.ai.generativelanguage.v1main."


@dataclass
class GeminiSettings(BatchBehaviour):
    """Batch knobs plus those of `generateContent`. Each call consumes at most one fault, checked in this order:
    429, 503, hang, broken JSON."""

    generate_answer: str | None = None
    """Exact text of every generateContent answer; None answers an instance of the requested response schema
    (or `answer to <prompt>` when no schema was requested)."""
    generate_429s: int = 0
    """The next K generateContent calls answer 429 RESOURCE_EXHAUSTED with Retry-After (and a RetryInfo detail)."""
    generate_503s: int = 0
    """The next K generateContent calls answer 503 UNAVAILABLE."""
    generate_hangs: int = 0
    """The next K generateContent calls wait `hang_s` before answering (cut short when the fake stops)."""
    hang_s: float = 30.0
    generate_bad_json: int = 0
    """The next K generateContent calls answer valid JSON that does not fit the requested schema."""

    def take_generate_fault(self) -> str | None:
        for fault in ("429s", "503s", "hangs", "bad_json"):
            name = f"generate_{fault}"
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return fault
        return None


def _error(
    code: int,
    status: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    error = {"code": code, "message": message, "status": status} | ({"details": details} if details else {})
    return JSONResponse({"error": error}, status_code=code, headers=headers)


def _rate_limited(retry_after: str) -> JSONResponse:
    return _error(
        429,
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
        {"retry-after": retry_after},
        [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}],
    )


def schema_instance(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A small value that satisfies a response schema, given either as Gemini's `responseSchema` (OpenAPI subset,
    upper-case types) or as `responseJsonSchema` (JSON Schema with `$defs`)."""
    root = root or schema
    if "$ref" in schema:
        *_, section, name = schema["$ref"].split("/")
        return schema_instance(root[section][name], root)
    if schema.get("enum"):
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        if schema.get(combinator):
            options = [option for option in schema[combinator] if str(option.get("type", "")).lower() != "null"]
            return schema_instance((options or schema[combinator])[0], root)
    kinds = schema.get("type", "object" if "properties" in schema else "string")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    kind = next((item for item in kinds if item.lower() != "null"), "null").lower()
    if kind == "object":
        return {name: schema_instance(part, root) for name, part in schema.get("properties", {}).items()}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), root) for _ in range(max(1, int(schema.get("minItems", 1))))]
    if kind in ("integer", "number"):
        value = schema.get("minimum", 0)
        return int(value) if kind == "integer" else float(value)
    return {"string": "text", "boolean": True, "null": None}.get(kind, "text")


def _breaking(schema: dict[str, Any] | None) -> str:
    """Valid JSON of the wrong top-level shape for `schema`."""
    wants_object = schema is None or str(schema.get("type", "object")).lower() == "object" or "$ref" in schema
    return json.dumps(["not", "the", "requested", "schema"] if wants_object else {"not": "the requested schema"})


def _proto_field(message: dict[str, Any], name: str) -> Any:
    """A field of a protobuf JSON message, which may be sent under its lowerCamel or its snake_case name (the SDK
    sends the file of an upload start as snake_case)."""
    snake = "".join(f"_{char.lower()}" if char.isupper() else char for char in name)
    return message.get(name, message.get(snake))


def _prompt(request: dict[str, Any]) -> str:
    contents = request.get("contents") or [{}]
    return " ".join(part.get("text", "") for part in contents[-1].get("parts", []))


def _generate_response(text: str, model: str, settings: BatchBehaviour, response_id: str) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": settings.input_tokens,
            "candidatesTokenCount": settings.output_tokens,
            "totalTokenCount": settings.input_tokens + settings.output_tokens,
        },
        "modelVersion": model,
        "responseId": response_id,
    }


@dataclass
class _File:
    name: str
    mime_type: str
    content: bytes
    display_name: str | None = None
    generated: bool = False
    created: float = field(default_factory=time.time)

    def body(self, base_url: str) -> dict[str, Any]:
        digest = base64.b64encode(hashlib.sha256(self.content).hexdigest().encode()).decode()
        body = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.content)),
            "createTime": rfc3339(self.created),
            "updateTime": rfc3339(self.created),
            "expirationTime": rfc3339(self.created + 48 * 3600),
            "sha256Hash": digest,
            "uri": f"{base_url}/v1beta/{self.name}",
            "state": "ACTIVE",
            "source": "GENERATED" if self.generated else "UPLOADED",
        }
        if self.display_name:
            body["displayName"] = self.display_name
        if self.generated:
            body["downloadUri"] = f"{base_url}/v1beta/{self.name}:download?alt=media"
        return body


@dataclass
class _Upload:
    file: dict[str, Any]
    content: bytearray = field(default_factory=bytearray)


@dataclass
class _Batch:
    name: str
    model: str
    display_name: str | None
    requests: dict[str, dict[str, Any]]
    metadata: dict[str, dict[str, Any]]
    input_file: str | None
    lifecycle: Lifecycle
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    ended: float | None = None
    output: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"successful": 0, "failed": 0})


class FakeGemini(FakeServer):
    """Fake Gemini API. `settings` holds the knobs (GeminiSettings); `batches_created` counts accepted batches."""

    def __init__(self, settings: GeminiSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or GeminiSettings()
        self._files: dict[str, _File] = {}
        self._uploads: dict[str, _Upload] = {}
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self.batches_created = 0

    def file_names(self) -> set[str]:
        """Names (`files/...`) of the files that exist now."""
        with self.lock:
            return set(self._files)

    def routes(self) -> list[Route]:
        return [
            self.route("/v1beta/models/{model}:generateContent", self._generate, "POST"),
            self.route("/v1beta/models/{model}:batchGenerateContent", self._create_batch, "POST"),
            self.route("/v1beta/batches", self._list_batches, "GET"),
            self.route("/v1beta/batches/{batch_id}:cancel", self._cancel_batch, "POST"),
            self.route("/v1beta/batches/{batch_id}", self._get_batch, "GET"),
            self.route("/v1beta/batches/{batch_id}", self._delete_batch, "DELETE"),
            self.route("/upload/v1beta/files", self._upload, "POST"),
            self.route("/v1beta/files/{file_id}:download", self._download, "GET"),
            self.route("/v1beta/files/{file_id}", self._get_file, "GET"),
            self.route("/v1beta/files/{file_id}", self._delete_file, "DELETE"),
        ]

    def _new_id(self) -> str:
        return f"{next(self._ids):016x}"

    async def _generate(self, request: Request) -> Response:
        body = json.loads(await request.body())
        with self.lock:
            fault = self.settings.take_generate_fault()
            response_id = self._new_id()
        if fault == "429s":
            return _rate_limited(self.settings.retry_after)
        if fault == "503s":
            return _error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if fault == "hangs":
            await self.pause(self.settings.hang_s)
        config = body.get("generationConfig", {})
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        if fault == "bad_json":
            text = _breaking(schema)
        elif self.settings.generate_answer is not None:
            text = self.settings.generate_answer
        elif schema:
            text = json.dumps(schema_instance(schema))
        else:
            text = f"answer to {_prompt(body)}"
        model = request.path_params["model"]
        return JSONResponse(_generate_response(text, model, self.settings, response_id))

    def _operation(self, batch: _Batch) -> dict[str, Any]:
        lifecycle = batch.lifecycle
        if lifecycle.outcome:
            state = _STATES[lifecycle.outcome]
        else:
            state = "BATCH_STATE_RUNNING" if lifecycle.polls else "BATCH_STATE_PENDING"
        total = len(lifecycle.keys)
        done = sum(batch.counts.values())
        metadata = {
            "@type": f"{_TYPE_PREFIX}GenerateContentBatch",
            "name": batch.name,
            "model": f"models/{batch.model}",
            "createTime": rfc3339(batch.created),
            "updateTime": rfc3339(batch.updated),
            "state": state,
            "batchStats": {
                "requestCount": str(total),
                "successfulRequestCount": str(batch.counts["successful"]),
                "failedRequestCount": str(batch.counts["failed"]),
                "pendingRequestCount": str(0 if lifecycle.outcome else total - done),
            },
        }
        if batch.display_name:
            metadata["displayName"] = batch.display_name
        if batch.input_file:
            metadata["inputConfig"] = {"fileName": batch.input_file}
        if batch.ended:
            metadata["endTime"] = rfc3339(batch.ended)
        operation = {"name": batch.name, "metadata": metadata, "done": lifecycle.outcome is not None}
        if lifecycle.outcome == "failed":
            operation["error"] = {"code": 13, "message": "Internal error encountered while running the batch."}
        if batch.output is not None:
            metadata["output"] = batch.output
            operation["response"] = {"@type": f"{_TYPE_PREFIX}GenerateContentBatchOutput", **batch.output}
        return operation

    async def _create_batch(self, request: Request) -> Response:
        spec = json.loads(await request.body()).get("batch", {})
        source = spec.get("inputConfig", {})
        with self.lock:
            fault = self.settings.take_create_fault()
            if retry_after := self.settings.refusal(fault):
                return _rate_limited(retry_after)
            if "fileName" in source:
                uploaded = self._files.get(source["fileName"])
                if uploaded is None:
                    return _error(404, "NOT_FOUND", f"File {source['fileName']} not found.")
                try:
                    lines = [json.loads(raw) for raw in uploaded.content.splitlines() if raw.strip()]
                except json.JSONDecodeError:
                    return _error(400, "INVALID_ARGUMENT", f"File {uploaded.name} is not valid JSONL.")
                requests = {str(line.get("key")): line.get("request", {}) for line in lines}
                metadata: dict[str, dict[str, Any]] = {}
            else:
                inline = source.get("requests", {}).get("requests", [])
                keyed = [
                    (str((item.get("metadata") or {}).get("key", index)), item) for index, item in enumerate(inline)
                ]
                requests = {key: item.get("request", {}) for key, item in keyed}
                metadata = {key: item.get("metadata") for key, item in keyed}
            if not requests:
                return _error(400, "INVALID_ARGUMENT", "The batch has no requests.")
            self.batches_created += 1
            batch = _Batch(
                f"batches/{self._new_id()}",
                request.path_params["model"].removeprefix("models/"),
                spec.get("displayName"),
                requests,
                metadata,
                source.get("fileName"),
                Lifecycle(self.batches_created, list(requests)),
            )
            self._batches[batch.name] = batch
            answer = JSONResponse(self._operation(batch))
        return await self.answer_created(fault, answer)

    def _batch(self, batch_id: str) -> _Batch | JSONResponse:
        found = self._batches.get(f"batches/{batch_id}")
        return found if found else _error(404, "NOT_FOUND", f"Batch batches/{batch_id} not found.")

    async def _get_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            if batch.lifecycle.outcome is None:
                batch.lifecycle.poll(self.settings)
                batch.updated = time.time()
                if batch.lifecycle.outcome is not None:
                    self._finish(batch)
            return JSONResponse(self._operation(batch))

    def _finish(self, batch: _Batch) -> None:
        lifecycle, settings = batch.lifecycle, self.settings
        batch.ended = batch.updated
        if lifecycle.outcome != "completed":
            return
        failing = set(lifecycle.errored(settings))
        results = settings.ordered(
            [
                (
                    key,
                    {"error": {"code": 3, "message": f"The fake was told to fail request {key}."}}
                    if key in failing
                    else {"response": _generate_response(f"answer to {key}", batch.model, settings, self._new_id())},
                )
                for key in lifecycle.done_keys
            ]
        )
        batch.counts.update(successful=len(results) - len(failing), failed=len(failing))
        if batch.input_file is None:
            inlined = [
                ({"metadata": batch.metadata[key]} if batch.metadata.get(key) else {}) | outcome
                for key, outcome in results
            ]
            batch.output = {"inlinedResponses": {"inlinedResponses": inlined}}
            return
        output = _File(
            f"files/batch-{batch.name.removeprefix('batches/')}",
            "application/jsonl",
            json_lines({"key": key} | outcome for key, outcome in results),
            generated=True,
        )
        self._files[output.name] = output
        batch.output = {"responsesFile": output.name}

    async def _list_batches(self, request: Request) -> Response:
        size = int(request.query_params.get("pageSize", 50))
        start = int(request.query_params.get("pageToken") or 0)
        with self.lock:
            newest_first = list(reversed(self._batches.values()))
            page = newest_first[start : start + size]
            body: dict[str, Any] = {"operations": [self._operation(batch) for batch in page]}
            if start + size < len(newest_first):
                body["nextPageToken"] = str(start + size)
            return JSONResponse(body)

    async def _cancel_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            if batch.lifecycle.outcome is not None:
                return _error(400, "FAILED_PRECONDITION", f"{batch.name} has already ended.")
            batch.lifecycle.cancel_requested = True
            return JSONResponse({})

    async def _delete_batch(self, request: Request) -> Response:
        with self.lock:
            batch = self._batch(request.path_params["batch_id"])
            if isinstance(batch, Response):
                return batch
            del self._batches[batch.name]
            return JSONResponse({})

    async def _upload(self, request: Request) -> Response:
        """The resumable protocol: `start` opens a session at an absolute upload URL (the SDK posts the bytes there
        as given), then `upload` chunks at increasing offsets, the last one with `finalize`."""
        command = request.headers.get("x-goog-upload-command", "")
        body = await request.body()
        with self.lock:
            if command == "start":
                session = self._new_id()
                self._uploads[session] = _Upload(json.loads(body or b"{}").get("file", {}))
                url = f"{self.base_url}/upload/v1beta/files?upload_id={session}&upload_protocol=resumable"
                return Response(
                    headers={
                        "x-goog-upload-url": url,
                        "x-goog-upload-status": "active",
                        "x-goog-upload-chunk-granularity": "8388608",
                    }
                )
            upload = self._uploads.get(request.query_params.get("upload_id", ""))
            if upload is None or "upload" not in command:
                return _error(
                    400, "INVALID_ARGUMENT", "Unknown upload session or command.", {"x-goog-upload-status": "final"}
                )
            if int(request.headers.get("x-goog-upload-offset", -1)) != len(upload.content):
                return _error(
                    400,
                    "INVALID_ARGUMENT",
                    "Upload offset does not match the bytes received.",
                    {"x-goog-upload-status": "final"},
                )
            upload.content += body
            if "finalize" not in command:
                return Response(headers={"x-goog-upload-status": "active"})
            del self._uploads[request.query_params["upload_id"]]
            name = upload.file.get("name") or f"files/{self._new_id()}"
            mime_type = _proto_field(upload.file, "mimeType") or request.headers.get(
                "x-goog-upload-header-content-type", "application/octet-stream"
            )
            stored = _File(name, mime_type, bytes(upload.content), _proto_field(upload.file, "displayName"))
            self._files[stored.name] = stored
            return JSONResponse({"file": stored.body(self.base_url)}, headers={"x-goog-upload-status": "final"})

    def _file(self, file_id: str) -> _File | JSONResponse:
        found = self._files.get(f"files/{file_id}")
        return found if found else _error(404, "NOT_FOUND", f"File files/{file_id} not found.")

    async def _get_file(self, request: Request) -> Response:
        with self.lock:
            found = self._file(request.path_params["file_id"])
            return found if isinstance(found, Response) else JSONResponse(found.body(self.base_url))

    async def _download(self, request: Request) -> Response:
        with self.lock:
            found = self._file(request.path_params["file_id"])
            if isinstance(found, Response):
                return found
            if not found.generated or request.query_params.get("alt") != "media":
                return _error(400, "INVALID_ARGUMENT", "Only generated files can be downloaded, with alt=media.")
            return Response(found.content, media_type=found.mime_type)

    async def _delete_file(self, request: Request) -> Response:
        with self.lock:
            found = self._file(request.path_params["file_id"])
            if isinstance(found, Response):
                return found
            del self._files[found.name]
            return JSONResponse({})

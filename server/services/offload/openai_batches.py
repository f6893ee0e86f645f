"""OpenAI's Batch API over the batch offload: a `/v1/batches` batch is a batch job (same id) read from a file of
`/v1/files`, whose results are written back as OpenAI's output and error files.

The input file is checked whole before anything runs, as OpenAI does: a line that is not JSON, names another
endpoint, repeats a custom_id, names another model than the first line or a model nobody serves, or whose body its
provider cannot run makes the batch `failed` with `errors` naming the lines (the job is recorded as failed, with no
items). The file is read twice in chunks (check, then insert), never held whole in memory. The lines' `model` picks
the provider: the served model (its `/v1/models` id or configured id) runs on our own generator at background
priority (`local`); another is looked up in BATCH_MODEL_ROUTES (or named `provider/model`) and goes to that
provider's batch API through the worker.

The job's status is the truth; `openai_status` maps it (and the output files' state) to OpenAI's. Once the job has
finished, the first reader writes the output and error files (streaming the items from the database a page at a
time), so a worker in another process needs to know nothing of this API.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.core.provider_names import LOCAL, PAID_PROVIDERS
from server.core.tenants import Principal
from server.db.batch_models import BatchItem, BatchJob, OpenAIBatch, StoredFile
from server.services.errors import FieldError, InputError
from server.services.offload.bodies import check_bodies
from server.services.offload.files import FileStore, aiter_lines, read_lines, utc
from server.services.offload.jobs import CUSTOM_ID, FINAL_STATUSES, Counts, JobNotFound, JobSpec, NewItem
from server.services.offload.registry import ProviderRegistry
from server.services.offload.service import BatchOffload

log = logging.getLogger(__name__)
ENDPOINT_KINDS = {"/v1/completions": "generate", "/v1/chat/completions": "chat", "/v1/embeddings": "embedding"}
COMPLETION_WINDOW = "24h"
JOB_TYPE = "openai-batch"
ID_PREFIX = "batch_"
# As /v1/completions: what a line leaves out is OpenAI's default, not the batch job's.
COMPLETION_DEFAULTS = {"max_tokens": 16, "temperature": 1.0}
MAX_ERRORS = 1000
INSERT_CHUNK = 500
# A reader that began writing a batch's output files and died leaves them to the next reader after this long.
FINALIZE_STALE = timedelta(minutes=10)
ITEM_ERROR_CODES = {"cancelled": "batch_cancelled", "expired": "batch_expired"}


@dataclass(frozen=True)
class Route:
    provider: str
    model: str


@dataclass(frozen=True)
class ModelRoutes:
    """BATCH_MODEL_ROUTES: `pattern=provider` entries, a trailing `*` matching by prefix, first match wins."""

    entries: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, setting: str) -> "ModelRoutes":
        entries = []
        for entry in filter(None, (part.strip() for part in setting.split(","))):
            pattern, _, provider = entry.partition("=")
            if not pattern.strip() or provider.strip() not in PAID_PROVIDERS:
                raise ValueError(
                    f"BATCH_MODEL_ROUTES entry {entry!r}: expected pattern=provider with provider one "
                    f"of {', '.join(PAID_PROVIDERS)}"
                )
            entries.append((pattern.strip(), provider.strip()))
        return cls(tuple(entries))

    def route(self, model: str, local_names: frozenset[str]) -> Route | None:
        if model in local_names:
            return Route(LOCAL, model)
        provider, slash, name = model.partition("/")
        if slash and provider in PAID_PROVIDERS and name:
            return Route(provider, name)
        for pattern, provider in self.entries:
            if model == pattern or (pattern.endswith("*") and model.startswith(pattern[:-1])):
                return Route(provider, model)
        return None


@dataclass
class Plan:
    """What checking an input file found: its lines' route and count, or the errors of its lines."""

    errors: list[dict]
    route: Route | None = None
    lines: int = 0


def line_error(line: int | None, code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def item_body(kind: str, body: dict) -> dict:
    """The job item's body for a line's body: its model is the job's, and a completion gets OpenAI's defaults."""
    stored = {key: value for key, value in body.items() if key != "model"}
    return {**COMPLETION_DEFAULTS, **stored} if kind == "generate" else stored


def parse_line(raw: bytes) -> dict | None:
    """The request object of a line, or None when the line is not a JSON object."""
    try:
        request = json.loads(raw)
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


def check_file(
    path: Path, endpoint: str, local_names: frozenset[str], routes: ModelRoutes, registry: ProviderRegistry
) -> Plan:
    """Check an input file line by line (blocking: run it in a thread); only the custom_ids seen are kept."""
    kind = ENDPOINT_KINDS[endpoint]
    plan = Plan(errors=[])
    seen: set[str] = set()
    model: str | None = None

    def fail(line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(plan.errors) < MAX_ERRORS:
            plan.errors.append(line_error(line, code, message, param))

    for number, raw in enumerate(read_lines(path), 1):
        if not raw.strip():
            continue
        plan.lines += 1
        request = parse_line(raw)
        if request is None:
            fail(number, "invalid_json_line", "This line is not a JSON object.")
            continue
        custom_id, body = request.get("custom_id"), request.get("body")
        if request.get("method") != "POST":
            fail(number, "invalid_method", "method must be POST.", "method")
        if request.get("url") != endpoint:
            fail(
                number,
                "mismatched_endpoint",
                f"url {request.get('url')!r} differs from the batch's endpoint "
                f"{endpoint!r}; a batch runs one endpoint.",
                "url",
            )
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            fail(number, "invalid_custom_id", "custom_id must be 1-64 characters of A-Z a-z 0-9 _ -.", "custom_id")
        elif custom_id in seen:
            fail(number, "duplicate_custom_id", f"custom_id {custom_id!r} appears on an earlier line.", "custom_id")
        else:
            seen.add(custom_id)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            fail(number, "missing_required_parameter", "body must be an object with a model.", "body.model")
            continue
        if model is None:
            model = body["model"]
            plan.route = routes.route(model, local_names)
            if plan.route is None:
                fail(
                    number,
                    "model_not_found",
                    f"The model {model!r} is neither served here (GET /v1/models) nor "
                    "routed to a provider by BATCH_MODEL_ROUTES.",
                    "body.model",
                )
                return plan
            try:
                registry.check(plan.route.provider, kind)
            except InputError as exc:
                fail(number, "unsupported_endpoint", f"{endpoint} cannot run model {model!r}: {exc}", "url")
                return plan
        elif body["model"] != model:
            fail(
                number,
                "mismatched_model",
                f"model {body['model']!r} differs from the first line's {model!r}; a batch runs one model.",
                "body.model",
            )
            continue
        if plan.route is not None:
            try:
                check_bodies(plan.route.provider, kind, [(str(custom_id), item_body(kind, body))], ())
            except InputError as exc:
                for error in exc.errors:
                    fail(
                        number,
                        "invalid_request",
                        error.msg,
                        ".".join(["body", *map(str, error.loc[1:])]) if len(error.loc) > 1 else "body",
                    )
    if plan.lines == 0:
        fail(None, "empty_file", "The input file has no requests.")
    return plan


def openai_status(job: BatchJob, batch: OpenAIBatch) -> str:
    """OpenAI's status of a batch, from its job's status and whether its output files are written. A finished
    job's failed requests are in the error file of a `completed` batch, as OpenAI reports them."""
    if batch.errors:
        return "failed"
    if job.status not in FINAL_STATUSES:
        if job.cancel_requested:
            return "cancelling"
        return "validating" if job.status == "queued" else "in_progress"
    if batch.finalized_at is None:
        return "cancelling" if job.status == "cancelled" else "finalizing"
    return {"cancelled": "cancelled", "expired": "expired"}.get(job.status, "completed")


@dataclass(frozen=True)
class BatchView:
    batch: OpenAIBatch
    job: BatchJob
    counts: Counts

    @property
    def status(self) -> str:
        return openai_status(self.job, self.batch)


def _stamp(moment: datetime | None) -> int | None:
    return None if moment is None else int(utc(moment).timestamp())


class OpenAIBatches:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], offload: BatchOffload, files: FileStore, routes: ModelRoutes
    ):
        self.sessions = sessions
        self.offload = offload
        self.files = files
        self.routes = routes

    async def create(
        self, principal: Principal, input_file_id: str, endpoint: str, metadata: dict[str, str] | None
    ) -> BatchView:
        source = await self.files.get(input_file_id, principal.tenant)
        if source.purpose != "batch":
            raise InputError(
                [
                    FieldError(
                        ("body", "input_file_id"), f"file {input_file_id} has purpose {source.purpose!r}, not 'batch'"
                    )
                ]
            )
        kind = ENDPOINT_KINDS[endpoint]
        path = self.files.path(source.id)
        plan = await asyncio.to_thread(
            check_file, path, endpoint, self.offload.generator_names, self.routes, self.offload.registry
        )
        route = plan.route or Route(LOCAL, "")
        spec = JobSpec(
            name=f"/v1/batches {source.filename}"[:200],
            provider=route.provider,
            model=route.model,
            kind=kind,
            job_type=JOB_TYPE,
            description=f"input file {source.id}, endpoint {endpoint}",
            metadata=metadata or {},
            tenant=principal.tenant,
        )
        if plan.errors:
            job = await self.offload.jobs.create(spec, owner=principal.key_id)
            await self.offload.jobs.transition(job.id, ["queued"], "failed", completed_at=clock.now())
        else:
            job = await self.offload.create_job(principal, spec, [])
            try:
                async for chunk in aiter_lines(path, INSERT_CHUNK):
                    items = [
                        NewItem(request["custom_id"], item_body(kind, request["body"]))
                        for request in filter(None, (parse_line(raw) for _, raw in chunk if raw.strip()))
                    ]
                    await self.offload.jobs.add_items(job.id, items)
            except BaseException:
                # A job left with part of its file would run that part at the next window.
                await self.offload.jobs.delete(job.id)
                raise
        row = OpenAIBatch(
            id=job.id,
            tenant=principal.tenant,
            input_file_id=source.id,
            endpoint=endpoint,
            completion_window=COMPLETION_WINDOW,
            batch_metadata=metadata,
            errors=plan.errors or None,
            created_at=job.created_at,
        )
        async with self.sessions() as session, session.begin():
            session.add(row)
        if not plan.errors:
            await self.offload.submit_now(job.id, principal.tenant)
        return await self.get(job.id, principal.tenant)

    async def _row(self, batch_id: str, tenant: str | None) -> OpenAIBatch:
        async with self.sessions() as session:
            row = await session.get(OpenAIBatch, batch_id)
        if row is None or (tenant is not None and row.tenant != tenant):
            raise JobNotFound(f"no batch {ID_PREFIX}{batch_id}")
        return row

    async def get(self, batch_id: str, tenant: str | None) -> BatchView:
        """The batch of `tenant` (None: any tenant), its output files written first if its job has finished."""
        row = await self._row(batch_id, tenant)
        job = await self.offload.jobs.get(batch_id, tenant)
        if job.status in FINAL_STATUSES and row.finalized_at is None and not row.errors:
            row = await self.finalize(row, job)
        return BatchView(row, job, (await self.offload.jobs.counts([job.id]))[job.id])

    async def page(self, tenant: str | None, *, limit: int, after: str | None) -> tuple[list[BatchView], bool]:
        """Newest first, after the batch `after`; and whether more follow."""
        query = select(OpenAIBatch.id).order_by(OpenAIBatch.created_at.desc(), OpenAIBatch.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(OpenAIBatch.tenant == tenant)
        if after is not None:
            cursor = await self._row(after, tenant)
            query = query.where(
                (OpenAIBatch.created_at < cursor.created_at)
                | ((OpenAIBatch.created_at == cursor.created_at) & (OpenAIBatch.id < cursor.id))
            )
        async with self.sessions() as session:
            ids = list((await session.scalars(query)).all())
        views = []
        for batch_id in ids[:limit]:
            try:
                views.append(await self.get(batch_id, tenant))
            except JobNotFound:
                continue  # its job was deleted through /batch/jobs
        return views, len(ids) > limit

    async def cancel(self, batch_id: str, tenant: str | None) -> BatchView:
        """Cancel the batch's job (409 once finished); the requests already done stay in the output file."""
        await self._row(batch_id, tenant)
        await self.offload.cancel(batch_id, tenant)
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(OpenAIBatch)
                .where(OpenAIBatch.id == batch_id, OpenAIBatch.cancelling_at.is_(None))
                .values(cancelling_at=clock.now())
            )
        return await self.get(batch_id, tenant)

    async def finalize(self, row: OpenAIBatch, job: BatchJob) -> OpenAIBatch:
        """Write the output and error files of a finished job, unless another reader is writing them."""
        started = clock.now()
        async with self.sessions() as session, session.begin():
            claimed = await session.execute(
                update(OpenAIBatch)
                .where(
                    OpenAIBatch.id == row.id,
                    OpenAIBatch.finalized_at.is_(None),
                    or_(OpenAIBatch.finalizing_at.is_(None), OpenAIBatch.finalizing_at < started - FINALIZE_STALE),
                )
                .values(finalizing_at=started)
            )
        if cast(CursorResult, claimed).rowcount != 1:
            return await self._row(row.id, None)
        output = await self._write(row, job, "output", True)
        errors = await self._write(row, job, "error", False)
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(OpenAIBatch)
                .where(OpenAIBatch.id == row.id)
                .values(output_file_id=output, error_file_id=errors, finalized_at=clock.now())
            )
        return await self._row(row.id, None)

    async def _write(self, row: OpenAIBatch, job: BatchJob, name: str, succeeded: bool) -> str | None:
        stored: StoredFile = await self.files.create(
            row.tenant, f"{ID_PREFIX}{row.id}_{name}.jsonl", "batch_output", self._lines(job, succeeded)
        )
        if stored.bytes == 0:
            await self.files.delete(stored.id, None)
            return None
        return stored.id

    async def _lines(self, job: BatchJob, succeeded: bool) -> AsyncIterator[bytes]:
        """The output file's lines (succeeded items) or the error file's (the others), a page of items at a time."""
        after = None
        while items := await self.offload.jobs.items(job.id, final_only=True, limit=INSERT_CHUNK, after=after):
            after = items[-1].custom_id
            lines = [
                json.dumps(result_line(job, item, self.offload.generation.generator.name))
                for item in items
                if (item.status == "succeeded") == succeeded
            ]
            if lines:
                yield ("\n".join(lines) + "\n").encode()


def result_line(job: BatchJob, item: BatchItem, served_model: str) -> dict:
    """One line of an output or error file, as OpenAI writes them."""
    line: dict = {"id": f"batch_req_{item.id}", "custom_id": item.custom_id, "response": None, "error": None}
    raw = item.raw if job.provider == "openai" and isinstance(item.raw, dict) else None
    if raw is not None and (raw.get("response") or raw.get("error")):
        # OpenAI's own line, under our ids.
        return line | {"response": raw.get("response"), "error": raw.get("error")}
    if item.status != "succeeded":
        return line | {
            "error": {"code": ITEM_ERROR_CODES.get(item.status, "request_failed"), "message": item.error or item.status}
        }
    return line | {
        "response": {"status_code": 200, "request_id": item.id, "body": response_body(job, item, served_model)}
    }


def response_body(job: BatchJob, item: BatchItem, served_model: str) -> dict:
    """What the endpoint would have answered: a text completion of the served model, or a chat completion
    built from a provider's answer."""
    output = item.output or {}
    prompt_tokens, completion_tokens = item.input_tokens or 0, item.output_tokens or 0
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    created = _stamp(item.completed_at) or int(time.time())
    if job.kind == "generate":
        return {
            "id": f"cmpl-{item.id}",
            "object": "text_completion",
            "created": created,
            "model": served_model,
            "choices": [
                {
                    "text": output.get("text", ""),
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": output.get("finish_reason"),
                }
            ],
            "usage": usage,
        }
    return {
        "id": f"chatcmpl-{item.id}",
        "object": "chat.completion",
        "created": created,
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": output.get("text")},
                "logprobs": None,
                "finish_reason": output.get("finish_reason") or "stop",
            }
        ],
        "usage": usage,
    }


def batch_times(view: BatchView) -> dict[str, int | None]:
    """OpenAI's timestamps of a batch (seconds since the epoch; None until it happens)."""
    batch, job, status = view.batch, view.job, view.status
    done = _stamp(batch.finalized_at)
    created = _stamp(batch.created_at) or 0
    return {
        "created_at": created,
        "in_progress_at": _stamp(job.submitted_at),
        "expires_at": created + 24 * 3600,
        "finalizing_at": _stamp(batch.finalizing_at),
        "completed_at": done if status == "completed" else None,
        "failed_at": created if status == "failed" else None,
        "expired_at": done if status == "expired" else None,
        "cancelling_at": _stamp(batch.cancelling_at),
        "cancelled_at": done if status == "cancelled" else None,
    }

"""Batch offload jobs: create, list, read, change, delete; their requests and responses."""

import csv
import io
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import StreamingResponse

from server.api.deps import AdminDep, OffloadDep, PrincipalDep, ScopeDep
from server.api.json_body import JSONBodyRoute
from server.api.offload.schemas import (
    AddedOut,
    AlertOut,
    BatchHealthOut,
    CountsOut,
    ItemOut,
    ItemPage,
    ItemStatus,
    JobCreate,
    JobOut,
    JobPage,
    JobPatch,
    JobStatus,
    ProcessIn,
    ProcessOut,
    Provider,
    QueueBulkIn,
    QueuedOut,
    QueueIn,
    QueueStatusOut,
    RequestsIn,
    ResponseOut,
    ResponsePage,
    SchedulerIn,
    SchedulerOut,
    UsageOut,
)
from server.api.pagination import Cursor, decode_cursor, encode_cursor
from server.core.destinations import public_form
from server.db.batch_models import BatchItem, BatchJob
from server.services.offload.jobs import Counts, JobSpec, NewItem
from server.services.offload.reports import REPORT_COLUMNS
from server.services.offload.service import QueueEntry

log = logging.getLogger(__name__)
router = APIRouter(prefix="/batch", tags=["batch"], route_class=JSONBodyRoute)
PAGE = Annotated[int, Query(ge=1, le=1000)]
JobId = Annotated[str, Path(max_length=64)]
# What a spreadsheet reads as the start of a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def inert(value: object) -> object:
    """A CSV cell that no spreadsheet evaluates: text starting like a formula gets a leading `'`."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def job_out(job: BatchJob, counts: Counts) -> JobOut:
    return JobOut(
        id=job.id,
        name=job.name,
        description=job.description,
        provider=job.provider,
        model=job.model,
        kind=job.kind,
        job_type=job.job_type,
        priority=job.priority,
        schedule=job.schedule,
        tenant=job.tenant,
        webhook_url=public_form(job.webhook_url),
        metadata=job.job_metadata,
        status=job.status,
        counts=CountsOut(**counts.__dict__),
        usage=UsageOut(input_tokens=job.input_tokens, output_tokens=job.output_tokens),
        cost_usd=job.cost_usd,
        realtime_cost_usd=job.realtime_cost_usd,
        savings_usd=job.savings_usd,
        created_at=job.created_at,
        updated_at=job.updated_at,
        submitted_at=job.submitted_at,
        completed_at=job.completed_at,
    )


def usage_of(item: BatchItem) -> UsageOut | None:
    if item.input_tokens is None and item.output_tokens is None:
        return None
    return UsageOut(input_tokens=item.input_tokens or 0, output_tokens=item.output_tokens or 0)


def item_out(item: BatchItem) -> ItemOut:
    return ItemOut(
        id=item.id,
        job_id=item.job_id,
        custom_id=item.custom_id,
        status=item.status,
        attempts=item.attempts,
        body=item.body,
        output=item.output,
        error=item.error,
        usage=usage_of(item),
        created_at=item.created_at,
        updated_at=item.updated_at,
        completed_at=item.completed_at,
    )


def response_out(item: BatchItem) -> ResponseOut:
    return ResponseOut(
        custom_id=item.custom_id,
        status=item.status,
        output=item.output,
        raw=item.raw,
        usage=usage_of(item),
        error=item.error,
        completed_at=item.completed_at,
    )


async def one_job(offload: OffloadDep, job_id: str, tenant: str | None) -> JobOut:
    job = await offload.jobs.get(job_id, tenant)
    return job_out(job, (await offload.jobs.counts([job.id]))[job.id])


@router.post("/jobs", status_code=201, response_model=JobOut)
async def create_job(body: JobCreate, offload: OffloadDep, response: Response, principal: PrincipalDep) -> JobOut:
    """A new job (status `queued`) of the caller's tenant, optionally with its requests. It runs at the next window,
    or at the next worker tick with `schedule: now`. A paid provider needs a key granted it (else 403)."""
    spec = JobSpec(
        name=body.name,
        description=body.description,
        provider=body.provider,
        model=body.model,
        kind=body.kind,
        job_type=body.job_type,
        priority=body.priority,
        schedule=body.schedule,
        webhook_url=body.webhook_url,
        metadata=body.metadata,
    )
    job = await offload.create_job(principal, spec, [NewItem(r.custom_id, r.body) for r in body.requests])
    response.headers["Location"] = f"/batch/jobs/{job.id}"
    return job_out(job, Counts(total=len(body.requests), pending=len(body.requests)))


@router.get("/jobs", response_model=JobPage)
async def list_jobs(
    offload: OffloadDep,
    scope: ScopeDep,
    status: JobStatus | None = None,
    provider: Provider | None = None,
    job_type: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Cursor = None,
) -> JobPage:
    """The tenant's jobs, newest first, filtered by status, provider and job_type."""
    after = None
    if cursor is not None:
        at, job_id = decode_cursor(cursor, 2)
        after = (datetime.fromisoformat(at), job_id)
    jobs, last = await offload.jobs.list_jobs(
        tenant=scope, status=status, provider=provider, job_type=job_type, limit=limit, cursor=after
    )
    counts = await offload.jobs.counts([job.id for job in jobs])
    return JobPage(
        items=[job_out(job, counts[job.id]) for job in jobs],
        next_cursor=encode_cursor(last.created_at.isoformat(), last.id) if last else None,
    )


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: JobId, offload: OffloadDep, scope: ScopeDep) -> JobOut:
    """One job of the tenant (another tenant's answers 404)."""
    return await one_job(offload, job_id, scope)


@router.patch("/jobs/{job_id}", response_model=JobOut)
async def change_job(job_id: JobId, body: JobPatch, offload: OffloadDep, scope: ScopeDep) -> JobOut:
    """Change name, description, priority or schedule; only while the job is queued (else 409)."""
    await offload.jobs.update(job_id, body.model_dump(exclude_unset=True), scope)
    return await one_job(offload, job_id, scope)


@router.delete("/jobs/{job_id}", status_code=204)
async def delete_job(job_id: JobId, offload: OffloadDep, scope: ScopeDep) -> Response:
    """Remove a job with its requests and responses; 409 while it is in flight (cancel it first)."""
    await offload.jobs.delete(job_id, scope)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/requests", response_model=AddedOut)
async def add_requests(job_id: JobId, body: RequestsIn, offload: OffloadDep, scope: ScopeDep) -> AddedOut:
    """Add requests to a queued job. Idempotent on custom_id: the same body again is a no-op; another body under
    an existing custom_id is a 409 (and nothing is added)."""
    result = await offload.add_requests(job_id, [NewItem(r.custom_id, r.body) for r in body.requests], scope)
    return AddedOut(added=result.added, unchanged=result.unchanged)


def _next(rows: list[BatchItem], limit: int) -> str | None:
    return encode_cursor(rows[-1].custom_id) if len(rows) == limit else None


@router.get("/jobs/{job_id}/requests", response_model=ItemPage)
async def list_requests(
    job_id: JobId,
    offload: OffloadDep,
    scope: ScopeDep,
    status: ItemStatus | None = None,
    limit: PAGE = 100,
    cursor: Cursor = None,
) -> ItemPage:
    """A job's requests in custom_id order, with their status."""
    after = decode_cursor(cursor, 1)[0] if cursor else None
    rows = await offload.jobs.items(job_id, tenant=scope, status=status, limit=limit, after=after)
    return ItemPage(items=[item_out(row) for row in rows], next_cursor=_next(rows, limit))


@router.get(
    "/jobs/{job_id}/responses", response_model=ResponsePage, responses={200: {"content": {"application/x-ndjson": {}}}}
)
async def list_responses(
    job_id: JobId,
    offload: OffloadDep,
    scope: ScopeDep,
    format: Literal["json", "jsonl"] = "json",
    limit: PAGE = 100,
    cursor: Cursor = None,
) -> ResponsePage | StreamingResponse:
    """Finished requests' responses in custom_id order: paginated JSON, or `?format=jsonl` streamed whole."""
    after = decode_cursor(cursor, 1)[0] if cursor else None
    if format == "json":
        rows = await offload.jobs.items(job_id, tenant=scope, final_only=True, limit=limit, after=after)
        return ResponsePage(items=[response_out(row) for row in rows], next_cursor=_next(rows, limit))
    await offload.jobs.get(job_id, scope)

    async def lines() -> AsyncIterator[bytes]:
        position = after
        while rows := await offload.jobs.items(job_id, final_only=True, limit=1000, after=position):
            for row in rows:
                yield response_out(row).model_dump_json().encode() + b"\n"
            position = rows[-1].custom_id

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/items/{item_id}", response_model=ItemOut)
async def get_item(item_id: JobId, offload: OffloadDep, scope: ScopeDep) -> ItemOut:
    """One request (e.g. from POST /batch/queue or a `Prefer: respond-async` request): its status and, once done,
    its output."""
    return item_out(await offload.jobs.item(item_id, scope))


@router.post("/jobs/{job_id}/submit", response_model=JobOut)
async def submit_job(job_id: JobId, offload: OffloadDep, scope: ScopeDep) -> JobOut:
    """Run a queued job now, ignoring its window (409 unless queued)."""
    await offload.submit_now(job_id, scope)
    return await one_job(offload, job_id, scope)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: JobId, offload: OffloadDep, scope: ScopeDep) -> JobOut:
    """Cancel a job and its provider batches; finished items are kept (409 once the job has finished)."""
    await offload.cancel(job_id, scope)
    return await one_job(offload, job_id, scope)


@router.post("/process", response_model=ProcessOut)
async def process(body: ProcessIn, offload: OffloadDep, scope: ScopeDep) -> ProcessOut:
    """Run the window now for the tenant's queued jobs that match (highest priority first, at most `max_jobs`);
    an admin's reach every tenant's (or `tenant`'s)."""
    return ProcessOut(
        job_ids=await offload.process(
            tenant=scope, provider=body.provider, job_type=body.job_type, max_jobs=body.max_jobs
        )
    )


@router.post("/process/all", response_model=ProcessOut)
async def process_all(offload: OffloadDep, scope: ScopeDep) -> ProcessOut:
    """Run the window now for every queued job of the tenant; an admin's run every tenant's queue (or `tenant`'s)."""
    return ProcessOut(job_ids=await offload.process(tenant=scope))


async def _enqueue(offload: OffloadDep, principal: PrincipalDep, entries: list[QueueIn]) -> list[QueuedOut]:
    queued = await offload.enqueue_entries(
        principal,
        [QueueEntry(e.provider, e.model, e.kind, e.job_type, e.priority, e.data) for e in entries],
    )
    return [QueuedOut(item_id=q.item_id, job_id=q.job_id) for q in queued]


@router.post("/queue", status_code=202, response_model=QueuedOut)
async def queue(body: QueueIn, offload: OffloadDep, response: Response, principal: PrincipalDep) -> QueuedOut:
    """Queue one item for the next window: it joins the open job of its provider, model, kind, job type and
    priority. Follow it at `Location`."""
    [queued] = await _enqueue(offload, principal, [body])
    response.headers["Location"] = f"/batch/items/{queued.item_id}"
    return queued


@router.post("/queue/bulk", status_code=202, response_model=list[QueuedOut])
async def queue_bulk(body: QueueBulkIn, offload: OffloadDep, principal: PrincipalDep) -> list[QueuedOut]:
    """Queue several items (each as with POST /batch/queue), answered in order."""
    return await _enqueue(offload, principal, body.items)


@router.get("/queue/status", response_model=QueueStatusOut)
async def queue_status(offload: OffloadDep, scope: ScopeDep) -> QueueStatusOut:
    """The tenant's items waiting to be submitted, by job type, provider and priority."""
    breakdown = await offload.queue_status(scope)
    return QueueStatusOut(
        waiting=sum(breakdown["provider"].values()),
        by_job_type=breakdown["job_type"],
        by_provider=breakdown["provider"],
        by_priority=breakdown["priority"],
    )


@router.get("/scheduler", response_model=SchedulerOut)
async def scheduler(offload: OffloadDep) -> SchedulerOut:
    """Whether this process runs the batch worker, and when the next window is."""
    return SchedulerOut(**offload.scheduler())


@router.post("/scheduler", response_model=SchedulerOut)
async def set_scheduler(body: SchedulerIn, offload: OffloadDep, admin: AdminDep) -> SchedulerOut:
    """Start or stop the batch worker in this process (its lease passes to another process when stopped). With
    ADMIN_API_KEYS set, an admin key only (403 for an ordinary key); the log names the key's id."""
    log.info(
        "batch scheduler %s by %s", "started" if body.running else "stopped", admin.key_id or "an anonymous caller"
    )
    if body.running:
        offload.start()
    else:
        await offload.stop()
    return SchedulerOut(**offload.scheduler())


@router.get("/stats")
async def stats(offload: OffloadDep, scope: ScopeDep) -> dict:
    """The tenant's jobs by status and provider, items by status, tokens, provider batches by status, item success
    rate."""
    return await offload.reports.stats(scope)


@router.get("/savings")
async def savings(
    offload: OffloadDep, scope: ScopeDep, days: Annotated[int | None, Query(ge=1, le=3660)] = None
) -> dict:
    """Cost at the batch price, the same usage at the real-time price, and the difference: in total, by provider, by
    job type and by day (UTC), over finished jobs (of the last `days` days if given)."""
    return await offload.reports.savings(scope, days=days)


@router.get("/alerts", response_model=list[AlertOut])
async def alerts(offload: OffloadDep, admin: AdminDep) -> list[AlertOut]:
    """Alerts active now: failure rate, batches in flight too long, queue backlog, savings milestones. They are
    figures over every tenant's jobs: admin keys only."""
    return [
        AlertOut(type=alert.type, severity=alert.severity, message=alert.message, since=since)
        for alert, since in await offload.active_alerts()
    ]


@router.get("/report", responses={200: {"content": {"text/csv": {}}}})
async def report(
    offload: OffloadDep,
    scope: ScopeDep,
    days: Annotated[int, Query(ge=1, le=3660)] = 30,
    format: Literal["json", "csv"] = "json",
) -> Response:
    """One row per job of the tenant created in the last `days` days: status, items, tokens, cost, real-time cost,
    savings. In CSV, a cell that a spreadsheet would read as a formula is escaped (a leading `'`)."""
    rows = await offload.reports.report(scope, days=days)
    if format == "json":
        return Response(json.dumps({"days": days, "jobs": rows}), media_type="application/json")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS)
    writer.writeheader()
    writer.writerows({column: inert(value) for column, value in row.items()} for row in rows)
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="batch-report-{days}d.csv"'},
    )


@router.get("/health", response_model=BatchHealthOut)
async def batch_health(offload: OffloadDep, admin: AdminDep) -> BatchHealthOut:
    """The batch scheduler: whether it runs here, who leads, the last and next runs, and each provider's state
    (`ok`, `unconfigured`, or `unreachable: <why>` from one cheap call, which takes its share of the egress quota);
    `degraded` while one of this process's batch loops is down or restarting. Admin keys only."""
    return BatchHealthOut(**await offload.status())

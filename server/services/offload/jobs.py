"""Jobs and their items: creation, idempotent adds on custom_id, listing, and the state machine.

Job status: queued -> submitted -> in_progress -> completed | partially_completed | failed | cancelled |
expired. Every change of status is a compare-and-set (`UPDATE ... WHERE status IN (:expected)`), so two
processes can never both move one job; the caller learns whether it won. A job moves through
`JobStore.transition`, except its last move, `finish_job` (worker.py), which books its cost in the same statement.

Item status: queued -> submitted (claimed, for a provider batch or the local runner) -> succeeded | failed |
cancelled | expired, or back to queued for another attempt. Items move through `move_items`, the one statement
that changes their status (run in the caller's transaction, beside what changes with it), and what an attempt's
outcome makes of an item is `after_attempt`'s decision, for the providers' results and the local runner's alike.

A job, its items and its provider batches belong to a tenant. Every read takes the caller's `tenant` (None: every
tenant, for an admin): another tenant's job or item is not found, exactly as one that does not exist.
"""

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Update, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.core.tenants import DEFAULT_TENANT
from server.db.batch_models import BatchItem, BatchJob
from server.db.session import affected
from server.services.errors import FieldError, InputError

Row = TypeVar("Row", BatchJob, BatchItem)
JOB_STATUSES = (
    "queued",
    "submitted",
    "in_progress",
    "completed",
    "partially_completed",
    "failed",
    "cancelled",
    "expired",
)
FINAL_STATUSES = frozenset({"completed", "partially_completed", "failed", "cancelled", "expired"})
IN_FLIGHT_STATUSES = frozenset({"submitted", "in_progress"})
ITEM_FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
CUSTOM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# What each kind of request must carry in its body (the provider-neutral shape).
BODY_FIELD = {"chat": "messages", "embedding": "input", "generate": "prompt", "predict": "text"}


def move_items(*where: ColumnElement[bool], to: str, **values: Any) -> Update:
    """The UPDATE that moves the items matching `where` to `to`, stamped now, and completed now when `to` is final.
    `where` names the status the items must still be in, so that the move is a compare-and-set: count the rows it
    affected to learn how many this call moved."""
    stamp = clock.now()
    if to in ITEM_FINAL_STATUSES:
        values.setdefault("completed_at", stamp)
    return update(BatchItem).where(*where).values(status=to, updated_at=stamp, **values)


def after_attempt(outcome: str, *, attempts: int, max_attempts: int, retryable: bool, cancel_requested: bool) -> str:
    """The status an attempt's `outcome` (an item result status) leaves an item in, after `attempts` attempts:
    success stands; a cancelled job's item is cancelled; a failure that another attempt may cure is queued again
    while attempts remain; anything else is final as it came."""
    if outcome == "succeeded":
        return "succeeded"
    if cancel_requested:
        return "cancelled"
    if retryable and attempts < max_attempts:
        return "queued"
    return outcome


class JobNotFound(LookupError):
    """HTTP 404."""


class JobConflict(RuntimeError):
    """The job's state forbids the operation, or a custom_id is reused with another body: HTTP 409."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    provider: str
    model: str
    kind: str
    job_type: str = "default"
    description: str = ""
    priority: int = 5
    schedule: str = "window"
    webhook_url: str | None = None
    metadata: dict = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class NewItem:
    custom_id: str
    body: dict


@dataclass(frozen=True)
class Counts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0


@dataclass(frozen=True)
class AddResult:
    added: int
    unchanged: int
    item_ids: list[str]


def new_id() -> str:
    return uuid.uuid4().hex


def digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_items(kind: str, items: Sequence[NewItem], loc: tuple[str | int, ...] = ("body", "requests")) -> None:
    """422 for a malformed custom_id, a body without the field its kind needs, or a custom_id given twice."""
    errors, seen = [], set()
    needed = BODY_FIELD[kind]
    for index, item in enumerate(items):
        where = (*loc, index)
        if not CUSTOM_ID.match(item.custom_id):
            errors.append(FieldError((*where, "custom_id"), "custom_id must be 1-64 characters of A-Z a-z 0-9 _ -"))
        elif item.custom_id in seen:
            errors.append(FieldError((*where, "custom_id"), f"custom_id {item.custom_id!r} appears twice"))
        seen.add(item.custom_id)
        if needed not in item.body:
            errors.append(FieldError((*where, "body"), f"a {kind} request needs `{needed}` in its body"))
    if errors:
        raise InputError(errors)


class JobStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]):
        self.sessions = sessions

    async def create(
        self, spec: JobSpec, items: Sequence[NewItem] = (), *, owner: str | None = None, accepting: bool = False
    ) -> BatchJob:
        check_items(spec.kind, items)
        at = clock.now()
        job = BatchJob(
            id=new_id(),
            tenant=spec.tenant,
            name=spec.name,
            description=spec.description,
            provider=spec.provider,
            model=spec.model,
            kind=spec.kind,
            job_type=spec.job_type,
            priority=spec.priority,
            schedule=spec.schedule,
            webhook_url=spec.webhook_url,
            job_metadata=spec.metadata,
            status="queued",
            accepting=accepting,
            input_tokens=0,
            output_tokens=0,
            cost_booked=False,
            cancel_requested=False,
            webhook_state="none",
            owner=owner,
            created_at=at,
            updated_at=at,
        )
        async with self.sessions() as session, session.begin():
            session.add(job)
            await session.flush()
            session.add_all(self._rows(job, items, at))
        return job

    @staticmethod
    def _rows(job: BatchJob, items: Iterable[NewItem], at: datetime) -> list[BatchItem]:
        return [
            BatchItem(
                id=new_id(),
                job_id=job.id,
                tenant=job.tenant,
                custom_id=item.custom_id,
                body=item.body,
                body_digest=digest(item.body),
                status="queued",
                attempts=0,
                created_at=at,
                updated_at=at,
            )
            for item in items
        ]

    async def _one(self, table: type[Row], key: str, what: str, tenant: str | None) -> Row:
        async with self.sessions() as session:
            row = await session.get(table, key)
        if row is None or (tenant is not None and row.tenant != tenant):
            raise JobNotFound(f"no batch {what} {key!r}")
        return row

    async def get(self, job_id: str, tenant: str | None = None) -> BatchJob:
        """The job, if it exists and belongs to `tenant` (None: any tenant); else `JobNotFound`."""
        return await self._one(BatchJob, job_id, "job", tenant)

    async def counts(self, job_ids: Sequence[str]) -> dict[str, Counts]:
        if not job_ids:
            return {}
        query = (
            select(BatchItem.job_id, BatchItem.status, func.count())
            .where(BatchItem.job_id.in_(job_ids))
            .group_by(BatchItem.job_id, BatchItem.status)
        )
        totals: dict[str, dict[str, int]] = {job_id: {} for job_id in job_ids}
        async with self.sessions() as session:
            for job_id, status, count in await session.execute(query):
                totals[job_id][status] = count
        return {
            job_id: Counts(
                total=sum(by.values()),
                succeeded=by.get("succeeded", 0),
                failed=sum(by.get(s, 0) for s in ("failed", "cancelled", "expired")),
                pending=by.get("queued", 0) + by.get("submitted", 0),
            )
            for job_id, by in totals.items()
        }

    async def list_jobs(
        self,
        *,
        tenant: str | None,
        status: str | None = None,
        provider: str | None = None,
        job_type: str | None = None,
        limit: int = 20,
        cursor: tuple[datetime, str] | None = None,
    ) -> tuple[list[BatchJob], BatchJob | None]:
        """Newest first; the last job of a full page is the cursor of the next (None on the last page)."""
        query = select(BatchJob).order_by(BatchJob.created_at.desc(), BatchJob.id.desc()).limit(limit + 1)
        for column, value in (
            (BatchJob.tenant, tenant),
            (BatchJob.status, status),
            (BatchJob.provider, provider),
            (BatchJob.job_type, job_type),
        ):
            if value is not None:
                query = query.where(column == value)
        if cursor is not None:
            at, job_id = cursor
            query = query.where((BatchJob.created_at < at) | ((BatchJob.created_at == at) & (BatchJob.id < job_id)))
        async with self.sessions() as session:
            jobs = list((await session.scalars(query)).all())
        return jobs[:limit], (jobs[limit - 1] if len(jobs) > limit else None)

    async def transition(self, job_id: str, expected: Iterable[str], to: str, **values) -> bool:
        """Move the job to `to` only if its status is one of `expected`; True when this call moved it."""
        statement = (
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.status.in_(list(expected)))
            .values(status=to, updated_at=clock.now(), **values)
        )
        async with self.sessions() as session, session.begin():
            return affected(await session.execute(statement)) == 1

    async def update(self, job_id: str, changes: dict, tenant: str | None = None) -> BatchJob:
        """Change name, description, priority or schedule; only while the job is queued."""
        await self.get(job_id, tenant)
        statement = (
            update(BatchJob)
            .where(BatchJob.id == job_id, BatchJob.status == "queued")
            .values(updated_at=clock.now(), **changes)
        )
        async with self.sessions() as session, session.begin():
            moved = affected(await session.execute(statement)) == 1
        job = await self.get(job_id)
        if not moved:
            raise JobConflict(f"batch job {job_id} is {job.status}: only a queued job can be changed")
        return job

    async def delete(self, job_id: str, tenant: str | None = None) -> None:
        """Remove a job that is not in flight (cancel it first), with its items and provider batches."""
        job = await self.get(job_id, tenant)
        async with self.sessions() as session, session.begin():
            statement = delete(BatchJob).where(BatchJob.id == job_id, BatchJob.status.not_in(IN_FLIGHT_STATUSES))
            if affected(await session.execute(statement)) == 1:
                await session.execute(delete(BatchItem).where(BatchItem.job_id == job_id))
                return
        raise JobConflict(f"batch job {job_id} is {job.status}: cancel it before deleting it")

    async def add_items(self, job_id: str, items: Sequence[NewItem], tenant: str | None = None) -> AddResult:
        """Add requests to a queued job. A custom_id already present with the same body is a no-op; with another
        body it is a conflict (nothing is added then)."""
        job = await self.get(job_id, tenant)
        check_items(job.kind, items)
        for attempt in range(2):
            try:
                return await self._add_items(job_id, items)
            except IntegrityError:
                # A concurrent add of the same custom_id won the race; a second pass sees its row.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _add_items(self, job_id: str, items: Sequence[NewItem]) -> AddResult:
        at = clock.now()
        async with self.sessions() as session, session.begin():
            job = await session.get(BatchJob, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"no batch job {job_id!r}")
            if job.status != "queued":
                raise JobConflict(f"batch job {job_id} is {job.status}: requests can only be added while it is queued")
            existing = {
                row.custom_id: row
                for row in (
                    await session.scalars(
                        select(BatchItem).where(
                            BatchItem.job_id == job_id, BatchItem.custom_id.in_([item.custom_id for item in items])
                        )
                    )
                ).all()
            }
            clashes = [
                item.custom_id
                for item in items
                if item.custom_id in existing and existing[item.custom_id].body_digest != digest(item.body)
            ]
            if clashes:
                raise JobConflict(
                    f"custom_id {clashes[0]!r} already exists in job {job_id} with another body"
                    + (f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else "")
                )
            rows = self._rows(job, [item for item in items if item.custom_id not in existing], at)
            session.add_all(rows)
            job.updated_at = at
        ids = {row.custom_id: row.id for row in rows} | {cid: row.id for cid, row in existing.items()}
        return AddResult(len(rows), len(items) - len(rows), [ids[item.custom_id] for item in items])

    async def items(
        self,
        job_id: str,
        *,
        tenant: str | None = None,
        status: str | None = None,
        final_only: bool = False,
        limit: int = 100,
        after: str | None = None,
    ) -> list[BatchItem]:
        """A job's items in custom_id order, after the custom_id `after` (keyset pagination)."""
        await self.get(job_id, tenant)
        query = select(BatchItem).where(BatchItem.job_id == job_id).order_by(BatchItem.custom_id).limit(limit)
        if status is not None:
            query = query.where(BatchItem.status == status)
        if final_only:
            query = query.where(BatchItem.status.in_(ITEM_FINAL_STATUSES))
        if after is not None:
            query = query.where(BatchItem.custom_id > after)
        async with self.sessions() as session:
            return list((await session.scalars(query)).all())

    async def item(self, item_id: str, tenant: str | None = None) -> BatchItem:
        return await self._one(BatchItem, item_id, "item", tenant)

"""The batch worker: submits due jobs, polls provider batches, stores results, finishes jobs.

`run_once()` is one tick, made only by the process holding the lease (`lease.py`):
1. Jobs due (schedule `now`, or their window has come) move queued -> submitted, highest priority first.
2. Queued items of submitted or running jobs are split into provider batches (`splitting.py`). Each batch is
   recorded as `submitting` with an idempotency key, and its items claimed (compare-and-set, and
   `FOR UPDATE SKIP LOCKED` on PostgreSQL), BEFORE the provider is called; the key travels with the
   provider's batch. A create is never repeated blind (`ProviderCalls.create`): after a failed attempt the
   batch is looked up by its key first. A `submitting` batch this process is not sending (a crash, a create
   that still failed, a long Retry-After) is looked up by its key at a later tick and created only if the
   provider says it has none. The lease is renewed in the background meanwhile.
3. Provider batches whose poll time has come are polled, each on its own: a failure is recorded on that
   batch (and its next poll pushed back), never stalling the others.
4. Terminal provider batches have their results stored, matched on custom_id; finished items of an expired
   or failed batch are kept; failed or expired items go back to the queue for a later batch until
   `max_attempts`; the provider's files are deleted.
5. A job whose items are all final gets its final status, usage and cost in ONE compare-and-set that also
   sets `cost_booked`: cost is booked exactly once, whoever gets there first. Its webhook is then called.
`local` jobs skip 2-4: the local runner (`local.py`) computes their items with our own models.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import cast, overload

from sqlalchemy import Integer, case, func, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock, metrics
from server.core.aio import wait_event
from server.core.provider_names import LOCAL
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch
from server.db.session import affected
from server.providers.base import (
    TERMINAL_STATES,
    BatchLimits,
    BatchProvider,
    ItemResult,
    Kind,
    LookupPending,
    NeutralRequest,
)
from server.services.offload.alerts import BatchAlerts
from server.services.offload.calls import CreateDeferred, ProviderCalls
from server.services.offload.jobs import FINAL_STATUSES, IN_FLIGHT_STATUSES, JobStore, after_attempt, move_items, new_id
from server.services.offload.lease import Lease, LeaseLost
from server.services.offload.pricing import PriceTable
from server.services.offload.splitting import split
from server.services.offload.webhooks import Webhooks
from server.services.offload.window import Window

log = logging.getLogger(__name__)
LIVE_BATCH_STATES = ("validating", "in_progress", "finalizing", "cancelling")
POLL_BACKOFF_MAX_S = 3600.0
# Clock difference tolerated between this server and a provider when recovering a batch by its creation time.
RECOVERY_SKEW = timedelta(minutes=5)


@dataclass
class TickReport:
    """What one tick did (returned by `run_once`, printed by `python -m server batch run-once`)."""

    submitted_jobs: int = 0
    provider_batches_created: int = 0
    recovered: int = 0
    polled: int = 0
    fetched: int = 0
    finished_jobs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@overload
def aware(moment: datetime) -> datetime: ...
@overload
def aware(moment: None) -> None: ...
def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored timestamp is UTC."""
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=UTC)


def kind_of(job: BatchJob) -> Kind:
    """A job's kind, stored as text: one of `Kind`, as the API accepts no other."""
    return cast(Kind, job.kind)


def submitted_id(batch: ProviderBatch) -> str:
    """The provider's id of a batch past `submitting`: the write that leaves that state sets it."""
    return cast(str, batch.provider_batch_id)


class BatchWorker:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        providers: dict[str, BatchProvider],
        limits: dict[str, BatchLimits],
        calls: ProviderCalls,
        prices: PriceTable,
        lease: Lease,
        window: Window,
        alerts: BatchAlerts,
        webhooks: Webhooks,
        jobs: JobStore,
        *,
        poll_interval_s: float,
        max_attempts: int,
    ):
        self.sessions = sessions
        self.providers = providers
        self.limits = limits
        self.calls = calls
        self.prices = prices
        self.lease = lease
        self.window = window
        self.poll_interval = timedelta(seconds=poll_interval_s)
        self.max_attempts = max_attempts
        self.alerts = alerts
        self.webhooks = webhooks
        self.jobs = jobs
        self._sending: set[str] = set()
        self._wakeup = asyncio.Event()
        self.last_run_at: datetime | None = None
        self.last_report: TickReport | None = None

    def wake(self) -> None:
        """Run the next tick now (a job was submitted or cancelled, or the window was forced)."""
        self._wakeup.set()

    async def run_forever(self) -> None:
        while True:
            # Cleared before the tick, so that a wake-up during the tick runs another one.
            self._wakeup.clear()
            try:
                if await self.lease.acquire():
                    await self.run_once()
            except Exception:
                # A driver may turn the task's cancellation into its own error: then stop, do not loop on.
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
                log.exception("batch worker tick failed; retrying at the next tick")
            await wait_event(self._wakeup, self.poll_interval.total_seconds())

    async def run_once(self) -> TickReport:
        report = TickReport()
        if not await self.lease.acquire():
            report.errors.append("another process holds the worker lease")
            return report
        started = clock.now()
        report.submitted_jobs = await self._start_due_jobs(started)
        for step in (self._request_cancels, self._submit_queued, self._recover, self._poll, self._fetch):
            await step(report)
        report.finished_jobs = await self.finish_jobs()
        await self.webhooks.resume()
        await self.alerts.update()
        self.last_run_at, self.last_report = started, report
        await self._update_queue_gauge()
        return report

    async def _start_due_jobs(self, now: datetime) -> int:
        async with self.sessions() as session:
            queued = (
                await session.scalars(
                    select(BatchJob)
                    .where(BatchJob.status == "queued", BatchJob.cancel_requested.is_(False))
                    .order_by(BatchJob.priority.desc(), BatchJob.created_at)
                )
            ).all()
        started = 0
        for job in queued:
            if job.schedule == "now" or self.window.due(aware(job.created_at), now):
                started += await self.jobs.transition(
                    job.id, ["queued"], "submitted", submitted_at=now, accepting=False
                )
        return started

    async def _jobs_with_queued_items(self) -> list[BatchJob]:
        waiting = select(BatchItem.job_id).where(BatchItem.status == "queued").distinct()
        async with self.sessions() as session:
            return list(
                (
                    await session.scalars(
                        select(BatchJob)
                        .where(
                            BatchJob.status.in_(IN_FLIGHT_STATUSES),
                            BatchJob.provider != LOCAL,
                            BatchJob.cancel_requested.is_(False),
                            BatchJob.id.in_(waiting),
                        )
                        .order_by(BatchJob.priority.desc(), BatchJob.created_at)
                    )
                ).all()
            )

    async def _submit_queued(self, report: TickReport) -> None:
        for job in await self._jobs_with_queued_items():
            try:
                report.provider_batches_created += await self._submit_job(job)
            except LeaseLost:
                raise
            except Exception as exc:
                report.errors.append(f"job {job.id}: {exc}")
                log.warning("submitting batch job %s failed: %s", job.id, exc)

    async def _claim(self, job: BatchJob) -> list[BatchItem]:
        query = (
            select(BatchItem)
            .where(BatchItem.job_id == job.id, BatchItem.status == "queued")
            .order_by(BatchItem.custom_id)
        )
        async with self.sessions() as session:
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            return list((await session.scalars(query)).all())

    async def _submit_job(self, job: BatchJob) -> int:
        provider = self.providers[job.provider]
        items, sizes = await self._sized(job, provider, await self._claim(job))
        limits = self.limits[job.provider]
        plan = split(sizes, limits)
        if plan.oversized:
            await self._fail_items(
                [items[i] for i in plan.oversized],
                f"the request is larger than {job.provider}'s batch limit of {limits.max_bytes} bytes",
            )
        created = 0
        for chunk in plan.chunks:
            batch = ProviderBatch(
                id=new_id(),
                job_id=job.id,
                tenant=job.tenant,
                provider=job.provider,
                status="submitting",
                item_count=len(chunk),
                byte_size=sum(sizes[i] for i in chunk),
                polls=0,
                created_at=clock.now(),
            )
            batch.idempotency_key = f"isrv-{batch.id}"
            chunk_items = [items[i] for i in chunk]
            if not await self._record_chunk(batch, chunk_items):
                continue
            created += 1
            await self._send(batch, job, chunk_items)
        return created

    async def _sized(
        self, job: BatchJob, provider: BatchProvider, items: list[BatchItem]
    ) -> tuple[list[BatchItem], list[int]]:
        """The items the provider's format can express, with their encoded sizes; each other one fails alone, with
        its reason, so that one malformed item never holds up its job."""
        kept, sizes = [], []
        for item in items:
            try:
                sizes.append(len(provider.line(job.model, kind_of(job), NeutralRequest(item.custom_id, item.body))))
            except Exception as exc:
                await self._fail_items(
                    [item], f"the request cannot be sent to {job.provider}: {type(exc).__name__}: {exc}"
                )
                continue
            kept.append(item)
        return kept, sizes

    async def _record_chunk(self, batch: ProviderBatch, items: list[BatchItem]) -> bool:
        """Insert the provider batch as `submitting` and claim its items, in one transaction."""
        async with self.sessions() as session, session.begin():
            session.add(batch)
            claimed = await session.execute(
                move_items(
                    BatchItem.id.in_([item.id for item in items]),
                    BatchItem.status == "queued",
                    to="submitted",
                    chunk_id=batch.id,
                    attempts=BatchItem.attempts + 1,
                )
            )
            if affected(claimed) != len(items):
                await session.rollback()
                return False
        return True

    async def _send(self, batch: ProviderBatch, job: BatchJob, items: list[BatchItem]) -> None:
        """Upload and create the provider batch of a recorded chunk (`items` in custom_id order: a request's
        position is its wire id's for Anthropic). A create that fails leaves the batch `submitting`."""
        await self.lease.ensure()
        provider = self.providers[job.provider]
        key = batch.idempotency_key
        wire = provider.wire_ids(key, [item.custom_id for item in items])
        requests = [NeutralRequest(wire_id, item.body) for wire_id, item in zip(wire, items, strict=True)]
        known = await self._known_ids(job.provider)
        since = aware(batch.created_at) - RECOVERY_SKEW
        self._sending.add(batch.id)
        try:
            async with self.lease.kept():
                source = await self.calls.call(
                    job.provider,
                    "upload",
                    lambda: provider.upload(job.model, kind_of(job), requests, key),
                    tenant=job.tenant,
                )
                provider_id = await self.calls.create(
                    job.provider,
                    lambda: provider.create(job.model, kind_of(job), requests, source, key),
                    lambda: provider.find(key, since=since, count=len(requests), known=known),
                    tenant=job.tenant,
                    before_attempt=self.lease.ensure,
                )
        except LeaseLost:
            raise
        except LookupPending as exc:
            await self._note(batch.id, f"waiting to tell whether the provider holds it: {exc}")
            return
        except CreateDeferred as exc:
            await self._note(
                batch.id, f"create deferred: {exc}", next_poll_at=clock.now() + timedelta(seconds=exc.wait_s)
            )
            log.warning("creating a %s batch for job %s: %s", job.provider, job.id, exc)
            return
        except Exception as exc:
            await self._note(batch.id, f"create failed ({exc}); looked up by its key and retried at a later tick")
            log.warning(
                "creating a %s batch for job %s failed: %s; looked up by its key and retried at a later tick",
                job.provider,
                job.id,
                exc,
            )
            return
        finally:
            self._sending.discard(batch.id)
        await self._submitted(batch.id, provider_id)

    async def _submitted(self, batch_id: str, provider_id: str) -> None:
        now = clock.now()
        async with self.sessions() as session, session.begin():
            recorded = await session.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch_id, ProviderBatch.status == "submitting", self.lease.fence())
                .values(
                    provider_batch_id=provider_id,
                    status="validating",
                    submitted_at=now,
                    error=None,
                    next_poll_at=now + self.poll_interval,
                )
            )
        if affected(recorded) != 1:
            # Another holder took over meanwhile: it finds this batch by its key and adopts it.
            raise LeaseLost(f"provider batch {provider_id} created after the lease was lost; left to its new holder")

    async def _note(self, batch_id: str, error: str, **values) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(ProviderBatch).where(ProviderBatch.id == batch_id).values(error=error[:2000], **values)
            )

    async def _batches(self, *conditions) -> list[ProviderBatch]:
        async with self.sessions() as session:
            return list(
                (
                    await session.scalars(select(ProviderBatch).where(*conditions).order_by(ProviderBatch.created_at))
                ).all()
            )

    async def _job(self, job_id: str) -> BatchJob:
        async with self.sessions() as session:
            return await session.get_one(BatchJob, job_id)

    async def _recover(self, report: TickReport) -> None:
        now = clock.now()
        for batch in await self._batches(
            ProviderBatch.status == "submitting",
            (ProviderBatch.next_poll_at.is_(None)) | (ProviderBatch.next_poll_at <= now),
        ):
            if batch.id in self._sending:
                continue
            await self.lease.ensure()
            job = await self._job(batch.job_id)
            provider = self.providers[batch.provider]
            known = await self._known_ids(batch.provider)
            since = aware(batch.created_at) - RECOVERY_SKEW
            try:
                found = await self.calls.call(
                    batch.provider,
                    "find",
                    partial(provider.find, batch.idempotency_key, since=since, count=batch.item_count, known=known),
                    tenant=batch.tenant,
                )
            except LookupPending as exc:
                await self._note(batch.id, f"waiting to tell whether the provider holds it: {exc}")
                continue
            except Exception as exc:
                await self._note(batch.id, f"lookup by idempotency key failed: {exc}")
                continue
            if found is not None:
                await self._submitted(batch.id, found)
                report.recovered += 1
                continue
            if job.cancel_requested:
                await self._drop_unsent(batch)
                continue
            async with self.sessions() as session:
                items = (
                    await session.scalars(
                        select(BatchItem).where(BatchItem.chunk_id == batch.id).order_by(BatchItem.custom_id)
                    )
                ).all()
            await self._send(batch, job, list(items))

    async def _drop_unsent(self, batch: ProviderBatch) -> None:
        """A batch the provider never received, of a job cancelled meanwhile: its items are cancelled, not sent."""
        now = clock.now()
        async with self.sessions() as session, session.begin():
            await session.execute(
                move_items(
                    BatchItem.chunk_id == batch.id,
                    BatchItem.status == "submitted",
                    to="cancelled",
                    error="cancelled before it was submitted",
                )
            )
            await session.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch.id, ProviderBatch.status == "submitting")
                .values(status="fetched", ended_at=now, error="cancelled before it was submitted")
            )

    async def _known_ids(self, provider: str) -> set[str]:
        async with self.sessions() as session:
            ids = (
                await session.scalars(
                    select(ProviderBatch.provider_batch_id).where(
                        ProviderBatch.provider == provider, ProviderBatch.provider_batch_id.is_not(None)
                    )
                )
            ).all()
            return set(cast(Sequence[str], ids))

    async def _poll(self, report: TickReport) -> None:
        now = clock.now()
        due = await self._batches(
            ProviderBatch.status.in_(LIVE_BATCH_STATES),
            (ProviderBatch.next_poll_at.is_(None)) | (ProviderBatch.next_poll_at <= now),
        )
        for batch in due:
            provider = self.providers[batch.provider]
            await self.lease.ensure()
            started = time.perf_counter()
            try:
                snapshot = await self.calls.call(
                    batch.provider, "poll", partial(provider.poll, submitted_id(batch)), tenant=batch.tenant
                )
            except Exception as exc:
                backoff = min(POLL_BACKOFF_MAX_S, self.poll_interval.total_seconds() * 2 ** min(batch.polls, 10))
                await self._note(batch.id, f"poll failed: {exc}", next_poll_at=now + timedelta(seconds=backoff))
                report.errors.append(f"provider batch {batch.id}: {exc}")
                continue
            finally:
                metrics.BATCH_POLL_SECONDS.labels(batch.provider).observe(time.perf_counter() - started)
            report.polled += 1
            values = {
                "status": snapshot.state,
                "polls": batch.polls + 1,
                "next_poll_at": now + self.poll_interval,
                "error": snapshot.error,
            }
            if snapshot.state in TERMINAL_STATES:
                values["ended_at"] = now
            async with self.sessions() as session, session.begin():
                await session.execute(
                    update(ProviderBatch)
                    .values(**values)
                    .where(ProviderBatch.id == batch.id, ProviderBatch.status == batch.status, self.lease.fence())
                )
            if snapshot.state != "validating":
                await self.jobs.transition(batch.job_id, ["submitted"], "in_progress")

    async def _fetch(self, report: TickReport) -> None:
        for batch in await self._batches(ProviderBatch.status.in_(TERMINAL_STATES)):
            provider = self.providers[batch.provider]
            await self.lease.ensure()
            try:
                async with self.lease.kept():
                    results = await self.calls.call(
                        batch.provider, "results", partial(provider.results, submitted_id(batch)), tenant=batch.tenant
                    )
            except Exception as exc:
                await self._note(batch.id, f"downloading results failed: {exc}")
                report.errors.append(f"provider batch {batch.id}: {exc}")
                continue
            await self._store_results(batch, results)
            report.fetched += 1
            try:
                await self.calls.call(
                    batch.provider, "cleanup", partial(provider.cleanup, submitted_id(batch)), tenant=batch.tenant
                )
            except Exception as exc:
                log.warning(
                    "deleting the files of %s batch %s failed: %s", batch.provider, batch.provider_batch_id, exc
                )

    async def _store_results(self, batch: ProviderBatch, results: list[ItemResult]) -> None:
        """Store a terminal batch's results on its items (matched on custom_id, through the provider's wire ids),
        in one transaction fenced by the lease: a stale holder stores nothing."""
        by_id = {result.custom_id: result for result in results}
        now = clock.now()
        async with self.sessions() as session, session.begin():
            job = await session.get_one(BatchJob, batch.job_id)
            chunk = (
                await session.scalars(
                    select(BatchItem).where(BatchItem.chunk_id == batch.id).order_by(BatchItem.custom_id)
                )
            ).all()
            wire = self.providers[batch.provider].wire_ids(batch.idempotency_key, [item.custom_id for item in chunk])
            wire_of = dict(zip((item.id for item in chunk), wire, strict=True))
            for item in chunk:
                if item.status != "submitted":
                    continue
                result = by_id.get(wire_of[item.id]) or ItemResult(
                    item.custom_id,
                    "failed",
                    None,
                    None,
                    error=f"no result from the provider (its batch {batch.status})",
                )
                item.updated_at = now
                item.input_tokens, item.output_tokens = result.input_tokens, result.output_tokens
                item.raw = result.raw
                item.status = after_attempt(
                    result.status,
                    attempts=item.attempts,
                    max_attempts=self.max_attempts,
                    retryable=result.status != "cancelled",
                    cancel_requested=job.cancel_requested,
                )
                item.error = None if item.status == "succeeded" else result.error
                if item.status == "succeeded":
                    item.output = result.output
                if item.status == "queued":
                    item.chunk_id = None
                else:
                    item.completed_at = now
            fetched = await session.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch.id, ProviderBatch.status == batch.status, self.lease.fence())
                .values(status="fetched", ended_at=batch.ended_at or now)
            )
            if affected(fetched) != 1:
                await session.rollback()
                raise LeaseLost(f"the results of provider batch {batch.id} were not stored: the lease was lost")

    async def _fail_items(self, items: list[BatchItem], reason: str) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(move_items(BatchItem.id.in_([item.id for item in items]), to="failed", error=reason))

    async def _request_cancels(self, report: TickReport) -> None:
        """Cancel the live provider batches of jobs whose cancellation was asked for."""
        cancelling = select(BatchJob.id).where(BatchJob.cancel_requested.is_(True))
        for batch in await self._batches(
            ProviderBatch.job_id.in_(cancelling), ProviderBatch.status.in_(("validating", "in_progress", "finalizing"))
        ):
            provider = self.providers[batch.provider]
            await self.lease.ensure()
            try:
                await self.calls.call(
                    batch.provider, "cancel", partial(provider.cancel, submitted_id(batch)), tenant=batch.tenant
                )
            except Exception as exc:
                report.errors.append(f"cancelling provider batch {batch.id}: {exc}")
                continue
            async with self.sessions() as session, session.begin():
                await session.execute(
                    update(ProviderBatch)
                    .where(ProviderBatch.id == batch.id, ProviderBatch.status == batch.status, self.lease.fence())
                    .values(status="cancelling", next_poll_at=clock.now())
                )

    async def finish_jobs(self) -> list[str]:
        """Book every job whose items are all final: status, usage and cost in one compare-and-set."""
        open_items = select(BatchItem.job_id).where(BatchItem.status.in_(("queued", "submitted"))).distinct()
        live = select(ProviderBatch.job_id).where(ProviderBatch.status.not_in(("fetched",))).distinct()
        async with self.sessions() as session:
            done = (
                await session.scalars(
                    select(BatchJob).where(
                        BatchJob.status.in_(IN_FLIGHT_STATUSES),
                        BatchJob.id.not_in(open_items),
                        BatchJob.id.not_in(live),
                    )
                )
            ).all()
        finished = []
        for job in done:
            if await finish_job(self.sessions, self.prices, job):
                finished.append(job.id)
                self.webhooks.job_finished(await self._job(job.id))
        return finished

    async def _update_queue_gauge(self) -> None:
        async with self.sessions() as session:
            waiting = await session.scalar(
                select(func.count()).select_from(BatchItem).where(BatchItem.status == "queued")
            )
        metrics.BATCH_QUEUE_ITEMS.set(waiting or 0)


async def finish_job(sessions: async_sessionmaker[AsyncSession], prices: PriceTable, job: BatchJob) -> bool:
    """Give a job whose items are all final its status, usage and cost; True for the one caller that did it."""
    async with sessions() as session:
        rows = (
            await session.execute(
                # A coalesced sum is never NULL, though SQLAlchemy types it as nullable as its first argument.
                select(
                    BatchItem.status,
                    func.count(),
                    type_coerce(func.coalesce(func.sum(BatchItem.input_tokens), 0), Integer),
                    type_coerce(func.coalesce(func.sum(BatchItem.output_tokens), 0), Integer),
                )
                .where(BatchItem.job_id == job.id)
                .group_by(BatchItem.status)
            )
        ).all()
    by_status = {status: count for status, count, _, _ in rows}
    input_tokens = sum(int(tokens) for _, _, tokens, _ in rows)
    output_tokens = sum(int(tokens) for _, _, _, tokens in rows)
    total, succeeded = sum(by_status.values()), by_status.get("succeeded", 0)
    if total and succeeded == total:
        status = "completed"
    elif succeeded:
        status = "partially_completed"
    elif total and by_status.get("expired", 0) == total:
        status = "expired"
    else:
        status = "failed" if total else "completed"
    cost = prices.cost(job.provider, job.model, input_tokens, output_tokens)
    now = clock.now()
    async with sessions() as session, session.begin():
        # A cancel that lands between the read above and this write is decided here, by the row itself.
        booked = await session.execute(
            update(BatchJob)
            .where(BatchJob.id == job.id, BatchJob.status.not_in(FINAL_STATUSES), BatchJob.cost_booked.is_(False))
            .values(
                status=case((BatchJob.cancel_requested.is_(True), "cancelled"), else_=status),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_usd=cost.cost_usd,
                realtime_cost_usd=cost.realtime_cost_usd,
                savings_usd=cost.savings_usd,
                cost_booked=True,
                completed_at=now,
                updated_at=now,
                accepting=False,
                webhook_state="pending" if job.webhook_url else "none",
            )
        )
        if affected(booked) != 1:
            return False
        status = (await session.execute(select(BatchJob.status).where(BatchJob.id == job.id))).scalar_one()
    metrics.BATCH_JOBS.labels(job.provider, status).inc()
    for item_status, count in by_status.items():
        metrics.BATCH_ITEMS.labels(job.provider, item_status).inc(count)
    if cost.savings_usd:
        metrics.BATCH_SAVINGS.labels(job.provider).inc(cost.savings_usd)
    log.info(
        "batch job %s (%s) %s: %d/%d succeeded, cost %s, saved %s",
        job.id,
        job.name,
        status,
        succeeded,
        total,
        "unknown" if cost.cost_usd is None else f"${cost.cost_usd:.4f}",
        "unknown" if cost.savings_usd is None else f"${cost.savings_usd:.4f}",
    )
    return True

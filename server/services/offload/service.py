"""The batch offload as the API sees it: jobs, the single-item queue, cancel, run-now, and the worker's lifecycle.

The worker and the local runner run in this process when `BATCH_WORKER=in-process` (the default, so a
single machine needs nothing more); with `off`, the web process only records work and another process
(`python -m server worker`, or cron running `python -m server batch run-once`) does it. Each runs under a
`Supervisor` (restarted with backoff after an unexpected error, counted, logged); `health()` is degraded
while one is down or restarting.

Work is created by a `Principal` (its tenant owns the job; a paid provider needs the key's grant) and read within a
`tenant` (None: every tenant, for an admin), so that one tenant never sees, runs or cancels another's jobs.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.core.destinations import DestinationPolicy, RefusedDestination
from server.core.provider_names import LOCAL, PAID_PROVIDERS, PROVIDERS
from server.core.supervisor import Supervisor
from server.core.tenants import Principal
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch
from server.db.session import affected
from server.providers.base import ProviderError
from server.services.errors import FieldError, InputError, NotGranted
from server.services.limits.egress import EgressLimited
from server.services.offload.alerts import Alert
from server.services.offload.bodies import check_bodies, check_model
from server.services.offload.jobs import (
    FINAL_STATUSES,
    AddResult,
    JobConflict,
    JobSpec,
    JobStore,
    NewItem,
    move_items,
    new_id,
)
from server.services.offload.local import LocalRunner
from server.services.offload.pricing import PriceTable
from server.services.offload.registry import ProviderRegistry
from server.services.offload.reports import BatchReports
from server.services.offload.worker import BatchWorker, TickReport, finish_job
from server.services.serving.generation import GenerationOptions, GenerationService
from server.services.serving.sentiment import SentimentService

log = logging.getLogger(__name__)
PING_TIMEOUT_S = 3.0
# `Prefer: respond-async` work: one open local job per kind, run as soon as the models are idle.
DEFERRED_JOB_TYPE = "respond-async"
DEFERRED_PRIORITY = 5


@dataclass(frozen=True)
class QueuedItem:
    item_id: str
    job_id: str


@dataclass(frozen=True)
class QueueEntry:
    """One item for the window, with what decides the open job it joins."""

    provider: str
    model: str
    kind: str
    job_type: str
    priority: int
    data: dict


class BatchOffload:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        jobs: JobStore,
        registry: ProviderRegistry,
        prices: PriceTable,
        worker: BatchWorker,
        runner: LocalRunner,
        generation: GenerationService,
        sentiment: SentimentService,
        destinations: DestinationPolicy,
        *,
        generator_model: str,
        in_process: bool,
    ):
        self.sessions = sessions
        self.destinations = destinations
        self.jobs = jobs
        self.registry = registry
        self.prices = prices
        self.worker = worker
        self.runner = runner
        self.generation = generation
        # A local generate job names the generator as clients do: its configured id (GENERATOR_MODEL), its served
        # name (with precision and device), or `gpt2` while the offline stand-in of GPT-2 serves it.
        served = generation.generator.name
        self.generator_names = frozenset({generator_model, served} | ({"gpt2"} if served.endswith(":gpt2") else set()))
        self.sentiment = sentiment
        self.reports = BatchReports(sessions)
        self.in_process = in_process
        self.supervisors = [
            Supervisor("batch-worker", self.worker.run_forever),
            Supervisor("batch-local-runner", self.runner.run_forever),
        ]

    @property
    def running(self) -> bool:
        return any(supervisor.state in ("running", "restarting") for supervisor in self.supervisors)

    def start(self) -> None:
        for supervisor in self.supervisors:
            supervisor.start()

    def health(self) -> dict:
        """`degraded` while a loop that should run here is not running (down, restarting or given up), or a webhook
        delivery this process made failed and waits to be made again; with each task's state, failures and last
        error."""
        tasks = {supervisor.name: supervisor.status() for supervisor in self.supervisors}
        webhooks = tasks["webhook-sender"] = self.worker.webhooks.status()
        down = (self.in_process and not all(supervisor.healthy for supervisor in self.supervisors)) or webhooks[
            "state"
        ] != "running"
        return {"status": "degraded" if down else "ok", "tasks": tasks}

    async def stop(self) -> None:
        for supervisor in self.supervisors:
            await supervisor.stop()
        await self.worker.webhooks.close()
        try:
            await self.worker.lease.release()
        except Exception as exc:
            # A database that is down or hung must not hold up the shutdown: the lease expires by itself.
            log.warning(
                "releasing the batch worker lease failed (%s: %s); it expires after BATCH_LEASE_TTL_S",
                type(exc).__name__,
                exc,
            )

    def wake(self) -> None:
        self.worker.wake()
        self.runner.wake()

    def scheduler(self) -> dict:
        """Whether this process runs the worker loop (BATCH_WORKER), and when jobs scheduled for the window run next
        (BATCH_SCHEDULE in BATCH_TIMEZONE)."""
        window = self.worker.window
        return {
            "running": self.running,
            "mode": "in-process" if self.in_process else "off",
            "schedule": window.cron,
            "timezone": str(window.zone),
            "next_window": window.next_after(clock.now()),
            "poll_interval_s": self.worker.poll_interval.total_seconds(),
        }

    async def status(self) -> dict:
        """`health()`, with the scheduler, the lease holder, the worker's last run, and each provider's state from
        one cheap call (which takes its share of the egress quota)."""
        holder = await self.worker.lease.holder()
        report = self.worker.last_report
        return {
            **self.health(),
            "scheduler": self.scheduler(),
            "leader": {"owner": holder.owner, "expires_at": holder.expires_at} if holder else None,
            "last_run_at": self.worker.last_run_at,
            "last_run": asdict(report) if report else None,
            "providers": await self.reachability(),
        }

    async def active_alerts(self) -> list[tuple[Alert, datetime | None]]:
        """Alerts active now over every tenant's jobs, each with the moment it became active (None until a worker
        tick has recorded it)."""
        states = await self.worker.alerts.states()
        return [
            (alert, states[alert.type].since if alert.type in states and states[alert.type].active else None)
            for alert in await self.worker.alerts.evaluate()
        ]

    async def run_once(self) -> TickReport:
        """One tick of the worker, then the local items it made runnable, computed to the end (for cron)."""
        report = await self.worker.run_once()
        if self.worker.lease.token is not None:
            await self.runner.requeue_orphans()
            while await self.runner.run_available():
                await self.runner.wait_idle()
            report.finished_jobs += await self.worker.finish_jobs()
            await self.worker.alerts.update()
        return report

    def authorise(self, principal: Principal, provider: str) -> None:
        """403 unless the key may create work for `provider` (our own models need no grant)."""
        if not principal.may_spend(provider):
            raise NotGranted(
                f"this API key is not granted provider {provider!r}: jobs for a paid provider need a key "
                f"whose grants list it (API_KEYS_FILE)"
            )

    async def check_webhook(self, url: str | None, loc: tuple[str | int, ...] = ("body", "webhook_url")) -> None:
        """422 for a webhook URL the server would refuse to call (see `server/core/destinations.py`)."""
        if url is None:
            return
        try:
            await self.destinations.resolve(url)
        except RefusedDestination as exc:
            raise InputError([FieldError(loc, f"webhook_url refused: {exc}")]) from None

    def check_work(
        self,
        provider: str,
        kind: str,
        model: str,
        items: list[tuple[str, dict]],
        loc: tuple[str | int, ...],
        model_loc: tuple[str | int, ...] = ("body", "model"),
    ) -> None:
        """422 for a model or a request body that `provider`'s `kind` cannot run (see `bodies.py`)."""
        check_model(provider, kind, model, self.generator_names, model_loc)
        check_bodies(provider, kind, items, loc)

    async def create_job(self, principal: Principal, spec: JobSpec, items: list[NewItem]) -> BatchJob:
        self.authorise(principal, spec.provider)
        self.registry.check(spec.provider, spec.kind)
        self.check_work(
            spec.provider, spec.kind, spec.model, [(item.custom_id, item.body) for item in items], ("body", "requests")
        )
        await self.check_webhook(spec.webhook_url)
        job = await self.jobs.create(replace(spec, tenant=principal.tenant), items, owner=principal.key_id)
        if spec.schedule == "now":
            self.wake()
        return job

    async def add_requests(self, job_id: str, items: list[NewItem], tenant: str | None) -> AddResult:
        """Add requests to a job of `tenant`, each checked as at the job's creation."""
        job = await self.jobs.get(job_id, tenant)
        self.check_work(
            job.provider, job.kind, job.model, [(item.custom_id, item.body) for item in items], ("body", "requests")
        )
        return await self.jobs.add_items(job_id, items, tenant)

    async def submit_now(self, job_id: str, tenant: str | None) -> BatchJob:
        """Run a queued job at the next worker tick, whatever its window."""
        job = await self.jobs.get(job_id, tenant)
        if job.status != "queued":
            raise JobConflict(f"batch job {job_id} is {job.status}: only a queued job can be submitted")
        await self.jobs.update(job_id, {"schedule": "now"})
        self.wake()
        return await self.jobs.get(job_id)

    async def process(
        self,
        *,
        tenant: str | None,
        provider: str | None = None,
        job_type: str | None = None,
        max_jobs: int | None = None,
    ) -> list[str]:
        """Run the window now for the queued jobs of `tenant` (None: every tenant's) that match: they are submitted
        at the next worker tick."""
        query = (
            select(BatchJob.id)
            .where(BatchJob.status == "queued", BatchJob.cancel_requested.is_(False))
            .order_by(BatchJob.priority.desc(), BatchJob.created_at)
        )
        if tenant is not None:
            query = query.where(BatchJob.tenant == tenant)
        if provider is not None:
            query = query.where(BatchJob.provider == provider)
        if job_type is not None:
            query = query.where(BatchJob.job_type == job_type)
        if max_jobs is not None:
            query = query.limit(max_jobs)
        async with self.sessions() as session, session.begin():
            ids = list((await session.scalars(query)).all())
            if ids:
                await session.execute(
                    update(BatchJob)
                    .where(BatchJob.id.in_(ids), BatchJob.status == "queued")
                    .values(schedule="now", accepting=False, updated_at=clock.now())
                )
        self.wake()
        return ids

    async def cancel(self, job_id: str, tenant: str | None) -> BatchJob:
        """Stop a job: its waiting items are cancelled at once, its provider batches are cancelled by the worker;
        items already finished are kept. 409 once the job has finished."""
        job = await self.jobs.get(job_id, tenant)
        stamp = clock.now()
        async with self.sessions() as session, session.begin():
            marked = await session.execute(
                update(BatchJob)
                .where(BatchJob.id == job_id, BatchJob.status.not_in(FINAL_STATUSES))
                .values(cancel_requested=True, accepting=False, updated_at=stamp)
            )
            if affected(marked) != 1:
                raise JobConflict(f"batch job {job_id} is {job.status}: it has already finished")
            await session.execute(
                move_items(
                    BatchItem.job_id == job_id,
                    BatchItem.status == "queued",
                    to="cancelled",
                    error="cancelled before it was submitted",
                )
            )
            live = await session.scalar(
                select(func.count())
                .select_from(ProviderBatch)
                .where(ProviderBatch.job_id == job_id, ProviderBatch.status != "fetched")
            )
            running = await session.scalar(
                select(func.count())
                .select_from(BatchItem)
                .where(BatchItem.job_id == job_id, BatchItem.status == "submitted")
            )
        if not live and not running:
            await finish_job(self.sessions, self.prices, await self.jobs.get(job_id))
        self.wake()
        return await self.jobs.get(job_id)

    async def enqueue(
        self,
        principal: Principal,
        *,
        provider: str,
        model: str,
        kind: str,
        job_type: str,
        priority: int,
        items: list[dict],
        schedule: str = "window",
    ) -> list[QueuedItem]:
        """Add single items to the caller's tenant's open job of their provider, model, kind, job type and priority
        (one is opened when there is none); the job closes when its window runs."""
        self.authorise(principal, provider)
        self.registry.check(provider, kind)
        new = [NewItem(f"item-{new_id()}", data) for data in items]
        # Queued items have no custom_id of the caller's: the error names the item's `data`.
        self.check_work(provider, kind, model, [("data", data) for data in items], ("body", "data"))
        for attempt in range(2):
            job = await self._open_job(principal, provider, model, kind, job_type, priority, schedule)
            try:
                result = await self.jobs.add_items(job.id, new)
                break
            except JobConflict:
                # The window closed this job between finding it and adding to it: open the next one.
                if attempt:
                    raise
        if schedule == "now":
            self.wake()
        return [QueuedItem(item_id, job.id) for item_id in result.item_ids]

    async def enqueue_entries(self, principal: Principal, entries: Sequence[QueueEntry]) -> list[QueuedItem]:
        """Queue entries, one add per open job (entries grouped by their job's key), answered in the given order."""
        groups: dict[tuple[str, str, str, str, int], list[int]] = {}
        for index, entry in enumerate(entries):
            groups.setdefault((entry.provider, entry.model, entry.kind, entry.job_type, entry.priority), []).append(
                index
            )
        answers: dict[int, QueuedItem] = {}
        for (provider, model, kind, job_type, priority), indices in groups.items():
            queued = await self.enqueue(
                principal,
                provider=provider,
                model=model,
                kind=kind,
                job_type=job_type,
                priority=priority,
                items=[entries[i].data for i in indices],
            )
            answers.update(zip(indices, queued, strict=True))
        return [answers[i] for i in range(len(entries))]

    async def _open_job(
        self, principal: Principal, provider: str, model: str, kind: str, job_type: str, priority: int, schedule: str
    ) -> BatchJob:
        async with self.sessions() as session:
            job = await session.scalar(
                select(BatchJob)
                .where(
                    BatchJob.accepting.is_(True),
                    BatchJob.status == "queued",
                    BatchJob.tenant == principal.tenant,
                    BatchJob.provider == provider,
                    BatchJob.model == model,
                    BatchJob.kind == kind,
                    BatchJob.job_type == job_type,
                    BatchJob.priority == priority,
                    BatchJob.schedule == schedule,
                )
                .order_by(BatchJob.created_at)
            )
        if job is not None:
            return job
        spec = JobSpec(
            name=f"queue: {job_type}",
            provider=provider,
            tenant=principal.tenant,
            model=model,
            kind=kind,
            job_type=job_type,
            priority=priority,
            schedule=schedule,
            description="single items from POST /batch/queue",
        )
        return await self.jobs.create(spec, accepting=True, owner=principal.key_id)

    async def defer_generation(
        self, principal: Principal, prompts: list[str], options: GenerationOptions
    ) -> list[QueuedItem]:
        """Validate prompts as /generate does, then queue them for the local models (`Prefer: respond-async`)."""
        self.generation.policy.check("generate", prompts)
        self.generation.plan(prompts, options)
        fields = {
            "max_tokens": options.max_new_tokens,
            "max_length": options.max_length,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "seed": options.seed,
        }
        bodies = [{"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}} for prompt in prompts]
        return await self.enqueue(
            principal,
            provider=LOCAL,
            model=self.generation.generator.name,
            kind="generate",
            job_type=DEFERRED_JOB_TYPE,
            priority=DEFERRED_PRIORITY,
            items=bodies,
            schedule="now",
        )

    async def defer_prediction(
        self, principal: Principal, texts: list[str], field: Literal["text", "texts"]
    ) -> list[QueuedItem]:
        """Validate texts as /predict does, then queue them for the local models (`Prefer: respond-async`)."""
        self.sentiment.check(texts, field)
        return await self.enqueue(
            principal,
            provider=LOCAL,
            model=self.sentiment.classifier.name,
            kind="predict",
            job_type=DEFERRED_JOB_TYPE,
            priority=DEFERRED_PRIORITY,
            items=[{"text": text} for text in texts],
            schedule="now",
        )

    async def reachability(self, timeout_s: float = PING_TIMEOUT_S) -> dict[str, str]:
        """Per provider: `ok`, `unconfigured` (no API key) or `unreachable: <why>` (one cheap call each, at once,
        under the egress quota like any other call: a probe answered `quota` spent nothing)."""

        async def probe(name: str) -> str:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.worker.calls.egress.acquire(name)
                    await self.worker.providers[name].ping()
            except EgressLimited as exc:
                return f"unreachable: {exc}"
            except (ProviderError, TimeoutError) as exc:
                return f"unreachable: {exc or 'no answer within ' + str(timeout_s) + ' s'}"
            return "ok"

        external = [name for name in PAID_PROVIDERS if name in self.worker.providers]
        answers = dict(zip(external, await asyncio.gather(*(probe(name) for name in external)), strict=True))
        return {name: "ok" if name == LOCAL else answers.get(name, "unconfigured") for name in PROVIDERS}

    async def queue_status(self, tenant: str | None) -> dict[str, dict[str, int]]:
        """Items of `tenant` (None: every tenant) waiting to be submitted, by job type, provider and priority."""
        query = (
            select(BatchJob.job_type, BatchJob.provider, BatchJob.priority, func.count())
            .join(BatchItem, BatchItem.job_id == BatchJob.id)
            .where(BatchItem.status == "queued")
            .group_by(BatchJob.job_type, BatchJob.provider, BatchJob.priority)
        )
        if tenant is not None:
            query = query.where(BatchJob.tenant == tenant)
        breakdown: dict[str, dict[str, int]] = {"job_type": {}, "provider": {}, "priority": {}}
        async with self.sessions() as session:
            for job_type, provider, priority, count in await session.execute(query):
                for axis, key in (("job_type", job_type), ("provider", provider), ("priority", str(priority))):
                    breakdown[axis][key] = breakdown[axis].get(key, 0) + count
        return breakdown

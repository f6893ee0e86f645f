"""What batch offload did: stats, savings (total, by provider, by job type, by day) and a per-job report, each
for one tenant (None: every tenant, for an admin)."""

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Integer, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch

REPORT_COLUMNS = (
    "id",
    "name",
    "provider",
    "model",
    "job_type",
    "status",
    "items",
    "succeeded",
    "failed",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "realtime_cost_usd",
    "savings_usd",
    "created_at",
    "completed_at",
)


@dataclass(frozen=True)
class Money:
    cost_usd: float
    realtime_cost_usd: float
    savings_usd: float
    jobs: int


def _money(row) -> Money:
    cost, realtime, savings, jobs = row
    return Money(float(cost or 0), float(realtime or 0), float(savings or 0), int(jobs or 0))


class BatchReports:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]):
        self.sessions = sessions

    async def stats(self, tenant: str | None) -> dict:
        """Jobs by status and provider, items by status, tokens, provider batches by status, success rate."""

        def own(table):
            return [] if tenant is None else [table.tenant == tenant]

        async with self.sessions() as session:
            jobs = (
                await session.execute(
                    select(BatchJob.provider, BatchJob.status, func.count())
                    .where(*own(BatchJob))
                    .group_by(BatchJob.provider, BatchJob.status)
                )
            ).all()
            items = dict(
                (
                    await session.execute(
                        select(BatchItem.status, func.count()).where(*own(BatchItem)).group_by(BatchItem.status)
                    )
                ).all()
            )
            tokens = (
                await session.execute(
                    select(
                        func.coalesce(func.sum(BatchJob.input_tokens), 0),
                        func.coalesce(func.sum(BatchJob.output_tokens), 0),
                    ).where(*own(BatchJob))
                )
            ).one()
            batches = dict(
                (
                    await session.execute(
                        select(ProviderBatch.status, func.count())
                        .where(*own(ProviderBatch))
                        .group_by(ProviderBatch.status)
                    )
                ).all()
            )
        by_status: dict[str, int] = {}
        by_provider: dict[str, dict[str, int]] = {}
        for provider, status, count in jobs:
            by_status[status] = by_status.get(status, 0) + count
            by_provider.setdefault(provider, {})[status] = count
        finished = sum(items.get(s, 0) for s in ("succeeded", "failed", "expired"))
        return {
            "jobs": {"total": sum(by_status.values()), "by_status": by_status, "by_provider": by_provider},
            "items": {"total": sum(items.values()), "by_status": items},
            "tokens": {"input": int(tokens[0]), "output": int(tokens[1])},
            "provider_batches": batches,
            "success_rate": items.get("succeeded", 0) / finished if finished else None,
        }

    async def savings(self, tenant: str | None, *, days: int | None = None) -> dict:
        """Booked cost and savings of finished jobs: total, by provider, by job type, by day (UTC)."""
        sums = (
            func.sum(BatchJob.cost_usd),
            func.sum(BatchJob.realtime_cost_usd),
            func.sum(BatchJob.savings_usd),
            func.count(),
        )
        booked = BatchJob.cost_booked.is_(True)
        conditions: list[ColumnElement[bool]] = [booked]
        if tenant is not None:
            conditions.append(BatchJob.tenant == tenant)
        if days is not None:
            conditions.append(BatchJob.completed_at >= clock.now() - timedelta(days=days))
        async with self.sessions() as session:
            total = (await session.execute(select(*sums).where(*conditions))).one()
            by_provider = (
                await session.execute(select(BatchJob.provider, *sums).where(*conditions).group_by(BatchJob.provider))
            ).all()
            by_type = (
                await session.execute(select(BatchJob.job_type, *sums).where(*conditions).group_by(BatchJob.job_type))
            ).all()
            finished = (
                await session.execute(
                    select(
                        BatchJob.completed_at, BatchJob.cost_usd, BatchJob.realtime_cost_usd, BatchJob.savings_usd
                    ).where(*conditions)
                )
            ).all()
            unknown = await session.scalar(
                select(func.count()).select_from(BatchJob).where(*conditions, BatchJob.cost_usd.is_(None))
            )
        by_day: dict[str, list[float]] = {}
        for completed_at, cost, realtime, savings in finished:
            assert completed_at is not None, "booking a job's cost completes it"
            day = by_day.setdefault(completed_at.date().isoformat(), [0.0, 0.0, 0.0, 0])
            day[0] += cost or 0
            day[1] += realtime or 0
            day[2] += savings or 0
            day[3] += 1
        return {
            "total": asdict(_money(total)),
            "by_provider": {name: asdict(_money(row)) for name, *row in by_provider},
            "by_job_type": {name: asdict(_money(row)) for name, *row in by_type},
            "by_day": {day: asdict(_money(values)) for day, values in sorted(by_day.items())},
            "jobs_with_unknown_price": int(unknown or 0),
        }

    async def report(self, tenant: str | None, *, days: int) -> list[dict]:
        """One row per job created in the last `days` days, newest first (columns: `REPORT_COLUMNS`)."""
        since = clock.now() - timedelta(days=days)
        counts = (
            select(
                BatchItem.job_id,
                func.count().label("item_count"),
                func.sum((BatchItem.status == "succeeded").cast(Integer)).label("succeeded"),
            )
            .group_by(BatchItem.job_id)
            .subquery()
        )
        query = (
            select(BatchJob, counts.c.item_count, counts.c.succeeded)
            .outerjoin(counts, counts.c.job_id == BatchJob.id)
            .where(BatchJob.created_at >= since)
            .order_by(BatchJob.created_at.desc())
        )
        if tenant is not None:
            query = query.where(BatchJob.tenant == tenant)
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        report = []
        for job, items, succeeded in rows:
            items, succeeded = int(items or 0), int(succeeded or 0)
            final = job.status in ("completed", "partially_completed", "failed", "cancelled", "expired")
            report.append(
                {
                    "id": job.id,
                    "name": job.name,
                    "provider": job.provider,
                    "model": job.model,
                    "job_type": job.job_type,
                    "status": job.status,
                    "items": items,
                    "succeeded": succeeded,
                    "failed": items - succeeded if final else 0,
                    "input_tokens": job.input_tokens,
                    "output_tokens": job.output_tokens,
                    "cost_usd": job.cost_usd,
                    "realtime_cost_usd": job.realtime_cost_usd,
                    "savings_usd": job.savings_usd,
                    "created_at": _iso(job.created_at),
                    "completed_at": _iso(job.completed_at),
                }
            )
        return report


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()

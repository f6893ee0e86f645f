"""What batch offload did (reports.py): stats, savings and the per-job report, per tenant or for every tenant."""

from datetime import datetime, timedelta

import pytest
from sqlalchemy import update

from server.core import clock
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch
from server.services.offload.jobs import JobSpec, JobStore, NewItem, new_id
from server.services.offload.reports import REPORT_COLUMNS, BatchReports


async def a_job(
    sessions,
    *,
    tenant: str = "acme",
    provider: str = "openai",
    job_type: str = "default",
    items: dict[str, str] | None = None,
    **values,
) -> BatchJob:
    """A job with items in the given statuses (custom_id -> status), its columns then set to `values`."""
    items = items or {}
    job = await JobStore(sessions).create(
        JobSpec("j", provider, "gpt-4o-mini", "chat", job_type=job_type, tenant=tenant),
        [NewItem(custom_id, {"messages": []}) for custom_id in items],
    )
    async with sessions() as session, session.begin():
        for custom_id, status in items.items():
            await session.execute(
                update(BatchItem)
                .where(BatchItem.job_id == job.id, BatchItem.custom_id == custom_id)
                .values(status=status)
            )
        if values:
            await session.execute(update(BatchJob).where(BatchJob.id == job.id).values(**values))
    return job


def booked(cost: float, realtime: float, completed_at: datetime | None = None) -> dict:
    return {
        "status": "completed",
        "cost_booked": True,
        "cost_usd": cost,
        "realtime_cost_usd": realtime,
        "savings_usd": realtime - cost,
        "completed_at": completed_at or clock.now(),
    }


async def test_stats_count_jobs_items_tokens_and_batches_of_the_tenant_only(sessions):
    await a_job(sessions, items={"a": "succeeded", "b": "failed"}, status="completed", input_tokens=10, output_tokens=4)
    await a_job(sessions, provider="anthropic", items={"a": "queued"}, input_tokens=5)
    other = await a_job(sessions, tenant="other", items={"a": "succeeded", "b": "succeeded"}, input_tokens=100)
    async with sessions() as session, session.begin():
        session.add(
            ProviderBatch(
                id=new_id(),
                job_id=other.id,
                tenant="other",
                provider="openai",
                idempotency_key="k1",
                status="in_progress",
                item_count=2,
                byte_size=10,
                created_at=clock.now(),
            )
        )
    reports = BatchReports(sessions)

    own = await reports.stats("acme")
    assert own["jobs"] == {
        "total": 2,
        "by_status": {"completed": 1, "queued": 1},
        "by_provider": {"openai": {"completed": 1}, "anthropic": {"queued": 1}},
    }
    assert own["items"] == {"total": 3, "by_status": {"succeeded": 1, "failed": 1, "queued": 1}}
    assert own["tokens"] == {"input": 15, "output": 4}
    assert own["provider_batches"] == {}
    assert own["success_rate"] == pytest.approx(0.5)

    everyone = await reports.stats(None)
    assert everyone["jobs"]["total"] == 3 and everyone["items"]["total"] == 5
    assert everyone["tokens"]["input"] == 115
    assert everyone["provider_batches"] == {"in_progress": 1}
    assert everyone["success_rate"] == pytest.approx(3 / 4)


async def test_a_success_rate_counts_only_finished_items_and_is_none_before_any(sessions):
    reports = BatchReports(sessions)
    assert (await reports.stats(None))["success_rate"] is None
    await a_job(sessions, items={"a": "queued", "b": "submitted", "c": "cancelled"})
    # Cancelled items were never tried to the end: they count neither way.
    assert (await reports.stats(None))["success_rate"] is None
    await a_job(sessions, items={"a": "succeeded", "b": "expired", "c": "failed", "d": "succeeded"})
    assert (await reports.stats(None))["success_rate"] == pytest.approx(0.5)


async def test_savings_add_up_booked_jobs_by_provider_type_and_day(sessions):
    today = clock.now()
    yesterday = today - timedelta(days=1)
    await a_job(sessions, provider="openai", job_type="scoring", **booked(1.0, 2.0, today))
    await a_job(sessions, provider="openai", job_type="tagging", **booked(0.5, 1.5, yesterday))
    await a_job(sessions, provider="anthropic", job_type="scoring", **booked(2.0, 4.0, today))
    # Not booked: no cost yet, whatever its columns say.
    await a_job(sessions, status="in_progress", cost_usd=100.0, realtime_cost_usd=200.0, savings_usd=100.0)
    await a_job(sessions, tenant="other", **booked(10.0, 20.0, today))

    savings = await BatchReports(sessions).savings("acme")
    assert savings["total"] == {"cost_usd": 3.5, "realtime_cost_usd": 7.5, "savings_usd": 4.0, "jobs": 3}
    assert savings["by_provider"] == {
        "openai": {"cost_usd": 1.5, "realtime_cost_usd": 3.5, "savings_usd": 2.0, "jobs": 2},
        "anthropic": {"cost_usd": 2.0, "realtime_cost_usd": 4.0, "savings_usd": 2.0, "jobs": 1},
    }
    assert savings["by_job_type"]["scoring"]["jobs"] == 2 and savings["by_job_type"]["tagging"]["jobs"] == 1
    assert list(savings["by_day"]) == sorted({yesterday.date().isoformat(), today.date().isoformat()})
    assert savings["by_day"][yesterday.date().isoformat()] == {
        "cost_usd": 0.5,
        "realtime_cost_usd": 1.5,
        "savings_usd": 1.0,
        "jobs": 1,
    }
    assert savings["jobs_with_unknown_price"] == 0
    assert (await BatchReports(sessions).savings(None))["total"]["jobs"] == 4


async def test_savings_of_the_last_days_leave_out_older_jobs_and_count_unknown_prices(sessions):
    await a_job(sessions, **booked(1.0, 2.0, clock.now() - timedelta(days=10)))
    unknown = await a_job(sessions, **booked(0.0, 0.0))
    async with sessions() as session, session.begin():
        await session.execute(
            update(BatchJob)
            .where(BatchJob.id == unknown.id)
            .values(cost_usd=None, realtime_cost_usd=None, savings_usd=None)
        )
    reports = BatchReports(sessions)
    recent = await reports.savings(None, days=7)
    assert recent["total"] == {"cost_usd": 0.0, "realtime_cost_usd": 0.0, "savings_usd": 0.0, "jobs": 1}
    assert recent["jobs_with_unknown_price"] == 1
    assert (await reports.savings(None))["total"]["jobs"] == 2


async def test_savings_are_zero_with_no_booked_job(sessions):
    savings = await BatchReports(sessions).savings(None)
    assert savings == {
        "total": {"cost_usd": 0.0, "realtime_cost_usd": 0.0, "savings_usd": 0.0, "jobs": 0},
        "by_provider": {},
        "by_job_type": {},
        "by_day": {},
        "jobs_with_unknown_price": 0,
    }


async def test_the_report_lists_recent_jobs_newest_first_with_failures_only_once_final(sessions):
    now = clock.now()
    old = await a_job(sessions, created_at=now - timedelta(days=40))
    finished = await a_job(
        sessions,
        items={"a": "succeeded", "b": "failed", "c": "expired"},
        created_at=now - timedelta(hours=2),
        **booked(1.0, 3.0, now - timedelta(hours=1)),
    )
    running = await a_job(
        sessions, items={"a": "succeeded", "b": "queued"}, status="in_progress", created_at=now - timedelta(hours=1)
    )
    empty = await a_job(sessions, created_at=now)
    await a_job(sessions, tenant="other", created_at=now)

    rows = await BatchReports(sessions).report("acme", days=30)
    assert [row["id"] for row in rows] == [empty.id, running.id, finished.id]
    assert all(tuple(row) == REPORT_COLUMNS for row in rows)
    by_id = {row["id"]: row for row in rows}
    assert (by_id[finished.id]["items"], by_id[finished.id]["succeeded"], by_id[finished.id]["failed"]) == (3, 1, 2)
    # A running job's unfinished items are not failures (yet).
    assert (by_id[running.id]["items"], by_id[running.id]["succeeded"], by_id[running.id]["failed"]) == (2, 1, 0)
    assert (by_id[empty.id]["items"], by_id[empty.id]["succeeded"], by_id[empty.id]["failed"]) == (0, 0, 0)
    assert by_id[finished.id]["savings_usd"] == pytest.approx(2.0)
    assert by_id[running.id]["completed_at"] is None
    # Timestamps come out aware (UTC), on SQLite as on PostgreSQL.
    completed = datetime.fromisoformat(by_id[finished.id]["completed_at"])
    assert completed.utcoffset() == timedelta(0)
    assert completed == pytest.approx(now - timedelta(hours=1), abs=timedelta(seconds=1))
    assert old.id in {row["id"] for row in await BatchReports(sessions).report(None, days=60)}
    assert len(await BatchReports(sessions).report(None, days=30)) == 4

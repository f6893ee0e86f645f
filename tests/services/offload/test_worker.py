"""The batch worker (worker.py): which jobs a tick starts, a job's final status and its cost booked once, and provider
batches driven against the fake OpenAI: created once, split by the provider's limits, cancelled on request."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from server.core import clock
from server.core.destinations import DestinationPolicy
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch, WorkerLease
from server.providers.base import BatchLimits, BatchProvider
from server.providers.openai_batch import OpenAIBatch
from server.services.limits.egress import EgressGuard
from server.services.limits.gcra import MemoryLimiter
from server.services.offload.alerts import BatchAlerts, Thresholds
from server.services.offload.calls import ProviderCalls
from server.services.offload.jobs import FINAL_STATUSES, JobSpec, JobStore, NewItem
from server.services.offload.lease import Lease
from server.services.offload.pricing import PriceTable
from server.services.offload.webhooks import Webhooks
from server.services.offload.window import Window
from server.services.offload.worker import BatchWorker, aware, finish_job
from tests.fakes import FakeOpenAI

PRICES = PriceTable.load()
MODEL = "gpt-4o-mini"
MAX_TICKS = 20


def a_worker(sessions, providers: dict[str, BatchProvider] | None = None, *, max_attempts: int = 3) -> BatchWorker:
    providers = providers or {}
    return BatchWorker(
        sessions,
        providers,
        {name: provider.limits for name, provider in providers.items()},
        ProviderCalls(EgressGuard(MemoryLimiter(), {}, fail_open=False), backoff_s=0.001, max_backoff_s=0.01),
        PRICES,
        Lease(sessions, ttl_s=30),
        Window("0 2 * * *"),
        BatchAlerts(sessions, Thresholds()),
        Webhooks(sessions, secret=None, destinations=DestinationPolicy.from_settings(False, "")),
        JobStore(sessions),
        poll_interval_s=0.0,
        max_attempts=max_attempts,
    )


async def a_job(
    sessions, items: dict[str, str] | None = None, *, provider: str = "openai", schedule: str = "now", **values
) -> BatchJob:
    """A job with items in the given statuses (custom_id -> status) and token counts of 10 in, 5 out each."""
    items = items or {}
    job = await JobStore(sessions).create(
        JobSpec("j", provider, MODEL, "chat", schedule=schedule),
        [NewItem(custom_id, {"messages": [{"role": "user", "content": custom_id}]}) for custom_id in items],
    )
    async with sessions() as session, session.begin():
        for custom_id, status in items.items():
            await session.execute(
                update(BatchItem)
                .where(BatchItem.job_id == job.id, BatchItem.custom_id == custom_id)
                .values(status=status, input_tokens=10, output_tokens=5)
            )
        if values:
            await session.execute(update(BatchJob).where(BatchJob.id == job.id).values(**values))
    return await JobStore(sessions).get(job.id)


def test_a_naive_timestamp_is_read_as_utc_and_an_aware_one_is_kept():
    assert aware(datetime(2026, 1, 2, 3, 4)) == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert aware(datetime(2026, 1, 2, 3, 4)).tzinfo is UTC
    plus_two = datetime(2026, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2)))
    assert aware(plus_two) is plus_two
    assert aware(None) is None


async def test_a_finished_job_gets_its_status_from_its_items(sessions):
    cases = [
        ({"a": "succeeded", "b": "succeeded"}, "completed"),
        ({"a": "succeeded", "b": "failed", "c": "expired"}, "partially_completed"),
        ({"a": "expired", "b": "expired"}, "expired"),
        ({"a": "expired", "b": "failed"}, "failed"),
        ({"a": "cancelled"}, "failed"),
        ({}, "completed"),
    ]
    for items, status in cases:
        job = await a_job(sessions, items, status="in_progress")
        assert await finish_job(sessions, PRICES, job)
        assert (await JobStore(sessions).get(job.id)).status == status, items


async def test_a_job_is_booked_once_with_its_usage_and_cost(sessions):
    job = await a_job(
        sessions, {"a": "succeeded", "b": "failed"}, status="in_progress", webhook_url="https://example.com/h"
    )
    assert await finish_job(sessions, PRICES, job)
    assert not await finish_job(sessions, PRICES, job)
    done = await JobStore(sessions).get(job.id)
    expected = PRICES.cost("openai", MODEL, 20, 10)
    assert (done.status, done.input_tokens, done.output_tokens) == ("partially_completed", 20, 10)
    assert done.cost_booked and done.completed_at is not None and not done.accepting
    assert done.cost_usd == pytest.approx(expected.cost_usd) and done.cost_usd > 0
    assert done.savings_usd == pytest.approx(expected.savings_usd) and done.savings_usd > 0
    assert done.webhook_state == "pending"


async def test_a_job_whose_cancel_was_asked_for_finishes_cancelled(sessions):
    job = await a_job(sessions, {"a": "succeeded", "b": "cancelled"}, status="in_progress", cancel_requested=True)
    assert await finish_job(sessions, PRICES, job)
    done = await JobStore(sessions).get(job.id)
    assert done.status == "cancelled" and done.cost_booked and done.webhook_state == "none"


async def test_a_job_already_final_is_not_booked_again(sessions):
    job = await a_job(sessions, {"a": "succeeded"}, status="cancelled")
    assert not await finish_job(sessions, PRICES, job)
    assert not (await JobStore(sessions).get(job.id)).cost_booked


async def test_a_tick_starts_jobs_due_now_or_by_their_window_and_leaves_the_others(sessions):
    now_job = await a_job(sessions, {"a": "queued"}, provider="local")
    due = await a_job(
        sessions, {"a": "queued"}, provider="local", schedule="window", created_at=clock.now() - timedelta(days=2)
    )
    waiting = await a_job(sessions, {"a": "queued"}, provider="local", schedule="window")
    cancelled = await a_job(sessions, {"a": "queued"}, provider="local", cancel_requested=True)
    report = await a_worker(sessions).run_once()
    assert report.submitted_jobs == 2 and report.errors == []
    statuses = {job.id: (await JobStore(sessions).get(job.id)).status for job in (now_job, due, waiting, cancelled)}
    # The window fires at 02:00: a job created just now waits for the next one.
    assert statuses[now_job.id] == statuses[due.id] == "submitted"
    assert statuses[waiting.id] == "queued"
    assert statuses[cancelled.id] == "queued"
    started = await JobStore(sessions).get(now_job.id)
    assert started.submitted_at is not None and not started.accepting


async def test_a_tick_finishes_a_local_job_whose_items_are_all_final(sessions):
    job = await a_job(sessions, {"a": "succeeded", "b": "failed"}, provider="local", status="in_progress")
    running = await a_job(sessions, {"a": "succeeded", "b": "submitted"}, provider="local", status="in_progress")
    worker = a_worker(sessions)
    report = await worker.run_once()
    assert report.finished_jobs == [job.id]
    assert (await JobStore(sessions).get(running.id)).status == "in_progress"
    assert worker.last_report is report and worker.last_run_at is not None


async def test_a_tick_of_a_process_whose_lease_was_taken_over_does_nothing(sessions):
    worker = a_worker(sessions)
    assert (await worker.run_once()).errors == []
    job = await a_job(sessions, {"a": "queued"}, provider="local")
    # The lease expires while its holder is paused, and another process takes it over.
    async with sessions() as session, session.begin():
        await session.execute(update(WorkerLease).values(expires_at=clock.now() - timedelta(seconds=1)))
    assert await Lease(sessions, ttl_s=30).acquire()
    report = await worker.run_once()
    assert report.errors == ["another process holds the worker lease"] and report.submitted_jobs == 0
    assert (await JobStore(sessions).get(job.id)).status == "queued"


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().serve() as fake:
        yield fake


OPENAI_LIMITS = BatchLimits(50_000, 200 * 1024 * 1024)


def openai(fake: FakeOpenAI, limits: BatchLimits = OPENAI_LIMITS) -> dict:
    return {"openai": OpenAIBatch("test-key", f"{fake.base_url}/v1", limits, timeout_s=10)}


async def run_until_final(worker: BatchWorker, sessions, job_id: str) -> BatchJob:
    for _ in range(MAX_TICKS):
        await worker.run_once()
        job = await JobStore(sessions).get(job_id)
        if job.status in FINAL_STATUSES:
            return job
    raise AssertionError(f"job still {job.status} after {MAX_TICKS} ticks")


async def items_of(sessions, job_id: str) -> dict[str, BatchItem]:
    async with sessions() as session:
        rows = (await session.scalars(select(BatchItem).where(BatchItem.job_id == job_id))).all()
    return {item.custom_id: item for item in rows}


async def test_a_provider_job_is_sent_in_one_batch_and_its_results_stored(sessions, fake_openai):
    fake_openai.settings.polls_to_complete = 2
    fake_openai.settings.out_of_order = True
    fake_openai.settings.create_faults = ["502_after"]
    worker = a_worker(sessions, openai(fake_openai))
    job = await a_job(sessions, {"q0": "queued", "q1": "queued", "q2": "queued"})
    first = await worker.run_once()
    assert first.provider_batches_created == 1 and first.errors == []
    done = await run_until_final(worker, sessions, job.id)
    assert done.status == "completed" and done.cost_booked
    # The create answered 502 after the fake had made the batch: it was found by its key, not made twice.
    assert fake_openai.batches_created == 1
    items = await items_of(sessions, job.id)
    assert {cid: item.output["text"] for cid, item in items.items()} == {f"q{i}": f"answer to q{i}" for i in range(3)}
    assert all(item.attempts == 1 and item.completed_at is not None for item in items.values())
    async with sessions() as session:
        [batch] = (await session.scalars(select(ProviderBatch))).all()
    assert batch.status == "fetched" and batch.provider_batch_id is not None and batch.ended_at is not None


async def test_an_item_too_large_for_the_provider_fails_alone_and_the_rest_are_split(sessions, fake_openai):
    limits = BatchLimits(max_requests=2, max_bytes=400)
    worker = a_worker(sessions, openai(fake_openai, limits))
    job = await JobStore(sessions).create(
        JobSpec("j", "openai", MODEL, "chat", schedule="now"),
        [NewItem(f"q{i}", {"messages": [{"role": "user", "content": "hi"}]}) for i in range(5)]
        + [NewItem("huge", {"messages": [{"role": "user", "content": "x" * 1000}]})],
    )
    report = await worker.run_once()
    assert report.provider_batches_created == 3
    done = await run_until_final(worker, sessions, job.id)
    items = await items_of(sessions, job.id)
    assert done.status == "partially_completed"
    assert items["huge"].status == "failed" and "larger than openai's batch limit" in items["huge"].error
    assert all(items[f"q{i}"].status == "succeeded" for i in range(5))
    assert fake_openai.batches_created == 3


async def test_a_cancel_stops_the_live_provider_batch_and_keeps_what_finished(sessions, fake_openai):
    fake_openai.settings.polls_to_complete = 1000
    fake_openai.settings.done_fraction = 0.5
    worker = a_worker(sessions, openai(fake_openai))
    job = await a_job(sessions, {f"q{i}": "queued" for i in range(4)})
    await worker.run_once()
    await worker.run_once()
    async with sessions() as session, session.begin():
        await session.execute(update(BatchJob).where(BatchJob.id == job.id).values(cancel_requested=True))
    done = await run_until_final(worker, sessions, job.id)
    assert done.status == "cancelled"
    items = await items_of(sessions, job.id)
    assert sorted(item.status for item in items.values()) == ["cancelled", "cancelled", "succeeded", "succeeded"]
    assert fake_openai.batches_created == 1


async def test_failed_items_are_sent_again_until_their_attempts_are_spent(sessions, fake_openai):
    fake_openai.settings.fail_item = lambda key: key.endswith("q1")
    fake_openai.settings.failed_batches = set()
    worker = a_worker(sessions, openai(fake_openai), max_attempts=2)
    job = await a_job(sessions, {"q0": "queued", "q1": "queued"})
    done = await run_until_final(worker, sessions, job.id)
    items = await items_of(sessions, job.id)
    assert done.status == "partially_completed"
    assert (items["q0"].status, items["q0"].attempts) == ("succeeded", 1)
    assert (items["q1"].status, items["q1"].attempts) == ("failed", 2) and items["q1"].error
    assert fake_openai.batches_created == 2

"""Batch alerts (alerts.py): which are active against their thresholds, and that each is announced once when it
starts (the savings milestone: once per new multiple), in the log, the gauge and the alert webhook."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from aiohttp import web
from sqlalchemy import delete, update

from server.core import clock
from server.core.destinations import DestinationPolicy
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch
from server.services.offload.alerts import BatchAlerts, Thresholds
from server.services.offload.jobs import JobSpec, JobStore, NewItem, new_id
from server.services.offload.webhooks import Webhooks
from tests.support.metrics import metric

LIMITS = Thresholds(failure_rate=0.25, max_age_h=48, max_queued_items=2, savings_step_usd=10.0)


async def a_job(sessions, items: int = 0, provider: str = "openai", **values) -> BatchJob:
    job = await JobStore(sessions).create(
        JobSpec("j", provider, "m", "chat"), [NewItem(f"c{i}", {"messages": []}) for i in range(items)]
    )
    if values:
        async with sessions() as session, session.begin():
            await session.execute(update(BatchJob).where(BatchJob.id == job.id).values(**values))
    return job


async def finished_jobs(sessions, *statuses: str, hours_ago: float = 1) -> None:
    for status in statuses:
        await a_job(sessions, status=status, completed_at=clock.now() - timedelta(hours=hours_ago))


async def a_provider_batch(sessions, status: str, hours_ago: float) -> None:
    job = await a_job(sessions, status="in_progress")
    async with sessions() as session, session.begin():
        session.add(
            ProviderBatch(
                id=new_id(),
                job_id=job.id,
                provider="openai",
                idempotency_key=new_id(),
                status=status,
                item_count=1,
                byte_size=1,
                created_at=clock.now() - timedelta(hours=hours_ago),
            )
        )


async def active(sessions, limits: Thresholds = LIMITS) -> dict[str, str]:
    return {alert.type: alert.message for alert in await BatchAlerts(sessions, limits).evaluate()}


async def test_nothing_is_active_on_an_empty_database(sessions):
    assert await active(sessions) == {}


async def test_the_failure_rate_fires_above_its_threshold_over_the_last_day_only(sessions):
    await finished_jobs(sessions, "completed", "completed", "completed", "failed")
    # One failure in four is the threshold itself, not above it.
    assert "failure_rate" not in await active(sessions)
    await finished_jobs(sessions, "failed", "failed", "failed", hours_ago=30)
    assert "failure_rate" not in await active(sessions)
    await finished_jobs(sessions, "partially_completed")
    assert "failure_rate" not in await active(sessions)
    await finished_jobs(sessions, "failed")
    assert (await active(sessions))["failure_rate"].startswith("2 of 6 batch jobs")


async def test_a_provider_batch_in_flight_too_long_is_long_running_and_a_finished_one_is_not(sessions):
    await a_provider_batch(sessions, "in_progress", hours_ago=47)
    await a_provider_batch(sessions, "completed", hours_ago=100)
    await a_provider_batch(sessions, "fetched", hours_ago=100)
    assert "long_running" not in await active(sessions)
    await a_provider_batch(sessions, "submitting", hours_ago=49)
    await a_provider_batch(sessions, "validating", hours_ago=50)
    assert (await active(sessions))["long_running"].startswith("2 batch(es) in flight for over 48 h")


async def test_a_local_job_running_too_long_is_long_running(sessions):
    old = clock.now() - timedelta(hours=49)
    await a_job(sessions, provider="local", status="completed", submitted_at=old)
    await a_job(sessions, provider="local", status="in_progress", submitted_at=clock.now())
    assert "long_running" not in await active(sessions)
    await a_job(sessions, provider="local", status="in_progress", submitted_at=old)
    assert "long_running" in await active(sessions)


async def test_a_queue_backlog_fires_above_its_threshold_of_queued_items(sessions):
    job = await a_job(sessions, items=3)
    async with sessions() as session, session.begin():
        await session.execute(
            update(BatchItem).where(BatchItem.job_id == job.id, BatchItem.custom_id == "c0").values(status="submitted")
        )
    assert "queue_backlog" not in await active(sessions)
    await a_job(sessions, items=1)
    assert (await active(sessions))["queue_backlog"].startswith("3 batch items are waiting")


async def test_the_savings_milestone_says_how_many_steps_were_passed(sessions):
    await a_job(sessions, savings_usd=9.99)
    assert "savings_milestone" not in await active(sessions)
    await a_job(sessions, savings_usd=15.0)
    [milestone] = [a for a in await BatchAlerts(sessions, LIMITS).evaluate() if a.type == "savings_milestone"]
    assert milestone.level == 2 and "$24.99" in milestone.message and "past $20" in milestone.message


async def test_an_alert_is_announced_once_when_it_starts_and_again_after_it_ended(sessions, caplog):
    alerts = BatchAlerts(sessions, LIMITS)
    job = await a_job(sessions, items=3)
    with caplog.at_level(logging.INFO, logger="server.services.offload.alerts"):
        assert [a.type for a in await alerts.update()] == ["queue_backlog"]
    assert "batch alert queue_backlog" in caplog.text
    assert metric("batch_alerts_active", type="queue_backlog") == 1
    assert metric("batch_alerts_active", type="failure_rate") == 0
    assert await alerts.update() == []
    first = (await alerts.states())["queue_backlog"]
    assert first.active and first.level == 0

    async with sessions() as session, session.begin():
        await session.execute(delete(BatchItem).where(BatchItem.job_id == job.id))
    assert await alerts.update() == []
    assert not (await alerts.states())["queue_backlog"].active
    assert metric("batch_alerts_active", type="queue_backlog") == 0

    await a_job(sessions, items=3)
    assert [a.type for a in await alerts.update()] == ["queue_backlog"]
    assert (await alerts.states())["queue_backlog"].active


async def test_the_savings_milestone_is_announced_once_per_new_multiple(sessions):
    alerts = BatchAlerts(sessions, LIMITS)
    await a_job(sessions, savings_usd=12.0)
    assert [(a.type, a.level) for a in await alerts.update()] == [("savings_milestone", 1)]
    await a_job(sessions, savings_usd=5.0)
    assert await alerts.update() == []
    await a_job(sessions, savings_usd=5.0)
    assert [(a.type, a.level) for a in await alerts.update()] == [("savings_milestone", 2)]
    assert (await alerts.states())["savings_milestone"].level == 2
    assert await alerts.update() == []


@asynccontextmanager
async def listener() -> AsyncIterator[tuple[int, list[dict]]]:
    """An HTTP server on 127.0.0.1 that records the JSON body of every POST."""
    heard: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        heard.append(json.loads(await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1], heard
    finally:
        await runner.cleanup()


async def test_a_started_alert_is_posted_to_the_alert_webhook_once(sessions):
    webhooks = Webhooks(
        sessions,
        secret=None,
        destinations=DestinationPolicy.from_settings(allow_http=True, allowed_hosts="127.0.0.1"),
        attempts=1,
    )
    async with listener() as (port, heard):
        alerts = BatchAlerts(sessions, LIMITS, webhooks=webhooks, webhook_url=f"http://127.0.0.1:{port}/hook")
        await a_job(sessions, items=3)
        await alerts.update()
        await alerts.update()
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.01)
        await webhooks.close()
    assert len(heard) == 1
    assert heard[0]["event"] == "batch.alert" and heard[0]["type"] == "queue_backlog"
    assert heard[0]["severity"] == "info" and heard[0]["message"].startswith("3 batch items")

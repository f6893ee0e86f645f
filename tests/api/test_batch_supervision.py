"""No batch job stuck forever: the worker and the local runner run supervised (a database error restarts the loop,
and health says degraded meanwhile), and local items left claimed by a runner that failed are queued again."""

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import text, update

from server.db.batch_models import BatchItem
from server.main import create_app
from tests.support.metrics import metric

DEADLINE_S = 60


def prompt(custom_id: str) -> dict:
    return {"custom_id": custom_id, "body": {"prompt": f"Story {custom_id}", "max_tokens": 3}}


async def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if answer := await condition():
            return answer
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_database_error_in_the_local_runner_restarts_it_with_health_degraded_and_the_job_finishes(
    settings, database_url
):
    app = create_app(
        settings.model_copy(
            update={"database_url": database_url, "batch_worker": "in-process", "batch_poll_interval_s": 0.1}
        )
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        runtime = app.state.runtime
        failures = metric("background_task_failures_total", task="batch-local-runner")
        job = (
            await client.post(
                "/batch/jobs",
                json={
                    "name": "survives",
                    "provider": "local",
                    "model": "gpt2",
                    "kind": "generate",
                    "requests": [prompt(f"p{i}") for i in range(3)],
                },
            )
        ).json()
        # A real database error, not a mock: the runner's query finds no table while it is renamed.
        async with runtime.engine.begin() as connection:
            await connection.execute(text("ALTER TABLE batch_items RENAME TO batch_items_away"))

        async def degraded():
            health = (await client.get("/batch/health")).json()
            return health if health["status"] == "degraded" else None

        health = await wait_for(degraded, "/batch/health to say degraded")
        assert health["tasks"]["batch-local-runner"]["failures"] >= 1
        assert "batch_items" in health["tasks"]["batch-local-runner"]["last_error"]
        assert (await client.get("/health")).json()["checks"]["batch"]["status"] == "degraded"
        assert metric("background_task_failures_total", task="batch-local-runner") > failures
        async with runtime.engine.begin() as connection:
            await connection.execute(text("ALTER TABLE batch_items_away RENAME TO batch_items"))
        await client.post(f"/batch/jobs/{job['id']}/submit")

        async def finished():
            answer = (await client.get(f"/batch/jobs/{job['id']}")).json()
            return answer if answer["status"] == "completed" else None

        done = await wait_for(finished, "the job to complete")
        assert done["counts"]["succeeded"] == 3

        async def healthy():
            return (await client.get("/batch/health")).json()["status"] == "ok"

        await wait_for(healthy, "/batch/health to say ok again")
        assert (await client.get("/health")).json()["checks"]["batch"]["status"] == "ok"


async def test_a_local_item_left_claimed_by_a_runner_that_failed_is_queued_again(client):
    runtime = client.app.state.runtime
    job = (
        await client.post(
            "/batch/jobs",
            json={
                "name": "stale",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "requests": [prompt("a"), prompt("b")],
            },
        )
    ).json()
    long_ago = datetime.now(UTC) - timedelta(seconds=runtime.settings.batch_local_requeue_s + 5)
    async with runtime.sessions() as session, session.begin():
        await session.execute(
            update(BatchItem)
            .where(BatchItem.job_id == job["id"])
            .values(status="submitted", attempts=1, updated_at=long_ago)
        )
    await client.post(f"/batch/jobs/{job['id']}/submit")
    await runtime.batch.worker.run_once()
    runner = runtime.batch.runner
    # One item is still being computed here (not stale, whatever its age); the other was abandoned.
    [computing] = [
        item["id"]
        for item in (await client.get(f"/batch/jobs/{job['id']}/requests")).json()["items"]
        if item["custom_id"] == "a"
    ]
    runner._claimed.add(computing)
    assert await runner.requeue_stale() == 1
    runner._claimed.discard(computing)
    assert await runner.requeue_stale() == 1
    await runtime.batch.run_once()
    done = (await client.get(f"/batch/jobs/{job['id']}")).json()
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 2

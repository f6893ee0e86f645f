"""Batch offload on the local models: jobs, the single-item queue, Prefer: respond-async, cancel, savings."""

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web
from sqlalchemy import update

from server.db.batch_models import BatchJob
from server.main import create_app
from server.services.offload.pricing import PriceTable
from server.services.offload.worker import finish_job
from server.services.scheduling.continuous import ContinuousBatcher
from tests.support.metrics import metric
from tests.support.waiting import until


def prompt(custom_id: str, text: str) -> dict:
    return {"custom_id": custom_id, "body": {"prompt": text, "max_tokens": 4}}


async def test_a_local_job_runs_to_completion_with_savings_against_the_reference_price(client):
    runtime = client.app.state.runtime
    body = {
        "name": "local",
        "provider": "local",
        "model": "gpt2",
        "kind": "generate",
        "schedule": "now",
        "requests": [prompt("a", "The cat"), prompt("b", "Once upon a time"), prompt("c", "The weather")],
    }
    job = (await client.post("/batch/jobs", json=body)).json()
    report = await runtime.batch.run_once()
    assert report.submitted_jobs == 1 and report.finished_jobs == [job["id"]]
    done = (await client.get(f"/batch/jobs/{job['id']}")).json()
    assert done["status"] == "completed" and done["counts"] == {"total": 3, "succeeded": 3, "failed": 0, "pending": 0}
    responses = (await client.get(f"/batch/jobs/{job['id']}/responses")).json()["items"]
    assert [r["custom_id"] for r in responses] == ["a", "b", "c"]
    direct = (await client.post("/generate", json={"prompts": ["The cat"], "max_new_tokens": 4})).json()[0]
    assert responses[0]["output"]["text"] == direct["completion"]
    usage = done["usage"]
    assert usage["output_tokens"] == 12 and usage["input_tokens"] == sum(r["usage"]["input_tokens"] for r in responses)
    expected = PriceTable.load(local_reference="openai:gpt-4o-mini").cost(
        "local", "gpt2", usage["input_tokens"], usage["output_tokens"]
    )
    assert done["cost_usd"] == 0 and done["savings_usd"] == pytest.approx(expected.savings_usd)
    assert (await runtime.batch.run_once()).finished_jobs == []
    lines = (await client.get(f"/batch/jobs/{job['id']}/responses", params={"format": "jsonl"})).text.splitlines()
    assert len(lines) == 3


async def test_queued_items_wait_for_the_window_until_processed(client):
    runtime = client.app.state.runtime
    item = {"job_type": "nightly", "provider": "local", "model": "sst2", "kind": "predict", "data": {"text": "great"}}
    first = await client.post("/batch/queue", json=item)
    assert first.status_code == 202 and first.headers["location"] == f"/batch/items/{first.json()['item_id']}"
    more = (await client.post("/batch/queue/bulk", json={"items": [item, {**item, "job_type": "other"}]})).json()
    assert more[0]["job_id"] == first.json()["job_id"] != more[1]["job_id"]
    status = (await client.get("/batch/queue/status")).json()
    assert status == {
        "waiting": 3,
        "by_job_type": {"nightly": 2, "other": 1},
        "by_provider": {"local": 3},
        "by_priority": {"5": 3},
    }
    assert (await runtime.batch.run_once()).submitted_jobs == 0
    processed = (await client.post("/batch/process", json={"job_type": "nightly"})).json()
    assert processed["job_ids"] == [first.json()["job_id"]]
    await runtime.batch.run_once()
    done = (await client.get(first.headers["location"])).json()
    assert done["status"] == "succeeded" and set(done["output"]) == {"label", "score"}
    assert (await client.get("/batch/queue/status")).json()["waiting"] == 1
    assert (await client.post("/batch/process/all")).json()["job_ids"] == [more[1]["job_id"]]


async def test_prefer_respond_async_answers_202_and_the_item_runs_in_the_background(client):
    runtime = client.app.state.runtime
    deferred = await client.post(
        "/generate",
        json={"prompts": ["The cat", "A dog"], "max_new_tokens": 3},
        headers={"Prefer": "respond-async, wait=0"},
    )
    assert deferred.status_code == 202 and deferred.headers["preference-applied"] == "respond-async"
    items = deferred.json()
    assert deferred.headers["location"] == items[0]["url"] and len(items) == 2
    assert (await client.get(items[0]["url"])).json()["status"] == "queued"
    background = metric("scheduler_background_items_total", model="generator")
    await runtime.batch.run_once()
    outputs = [(await client.get(item["url"])).json() for item in items]
    assert all(o["status"] == "succeeded" and o["usage"]["output_tokens"] == 3 for o in outputs)
    direct = (await client.post("/generate", json={"prompts": ["A dog"], "max_new_tokens": 3})).json()[0]
    assert outputs[1]["output"]["text"] == direct["completion"]
    assert metric("scheduler_background_items_total", model="generator") == background + 2
    predicted = await client.post("/predict", json={"text": "fine"}, headers={"Prefer": "respond-async"})
    assert predicted.status_code == 202
    refused = await client.post("/generate", json={"prompts": ["x" * 5000]}, headers={"Prefer": "respond-async"})
    assert refused.status_code == 422


async def test_cancel_keeps_finished_items_and_is_refused_once_final(client):
    runtime = client.app.state.runtime
    body = {
        "name": "c",
        "provider": "local",
        "model": "gpt2",
        "kind": "generate",
        "requests": [prompt("a", "one"), prompt("b", "two")],
    }
    job = (await client.post("/batch/jobs", json=body)).json()
    cancelled = (await client.post(f"/batch/jobs/{job['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["failed"] == 2
    again = await client.post(f"/batch/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert (await client.post(f"/batch/jobs/{job['id']}/submit")).status_code == 409
    assert (await runtime.batch.run_once()).submitted_jobs == 0


async def test_submit_now_runs_a_window_job_at_the_next_tick(client):
    runtime = client.app.state.runtime
    body = {"name": "w", "provider": "local", "model": "gpt2", "kind": "generate", "requests": [prompt("a", "x")]}
    job = (await client.post("/batch/jobs", json=body)).json()
    assert (await runtime.batch.run_once()).submitted_jobs == 0
    assert (await client.post(f"/batch/jobs/{job['id']}/submit")).json()["schedule"] == "now"
    await runtime.batch.run_once()
    assert (await client.get(f"/batch/jobs/{job['id']}")).json()["status"] == "completed"
    scheduler = (await client.get("/batch/scheduler")).json()
    assert scheduler["running"] is False and scheduler["schedule"] == "0 2 * * *"


async def test_stats_savings_report_and_health_add_up(client):
    runtime = client.app.state.runtime
    for job_type in ("scoring", "summaries"):
        body = {
            "name": job_type,
            "provider": "local",
            "model": "gpt2",
            "kind": "generate",
            "schedule": "now",
            "job_type": job_type,
            "requests": [prompt("a", "one two"), prompt("b", "three")],
        }
        await client.post("/batch/jobs", json=body)
    await runtime.batch.run_once()
    jobs = (await client.get("/batch/jobs")).json()["items"]
    stats = (await client.get("/batch/stats")).json()
    assert stats["jobs"]["by_status"] == {"completed": 2} and stats["items"]["by_status"] == {"succeeded": 4}
    assert stats["success_rate"] == 1.0
    assert stats["tokens"]["output"] == sum(job["usage"]["output_tokens"] for job in jobs) == 16
    savings = (await client.get("/batch/savings")).json()
    assert savings["total"]["savings_usd"] == pytest.approx(sum(job["savings_usd"] for job in jobs))
    assert set(savings["by_job_type"]) == {"scoring", "summaries"} and savings["total"]["jobs"] == 2
    assert list(savings["by_provider"]) == ["local"] and len(savings["by_day"]) == 1
    report = (await client.get("/batch/report", params={"days": 7})).json()["jobs"]
    assert {row["id"] for row in report} == {job["id"] for job in jobs}
    assert all(row["items"] == 2 and row["succeeded"] == 2 and row["failed"] == 0 for row in report)
    csv_text = (await client.get("/batch/report", params={"format": "csv"})).text
    assert csv_text.splitlines()[0].startswith("id,name,provider") and len(csv_text.splitlines()) == 3
    health = (await client.get("/batch/health")).json()
    assert health["providers"] == {
        "local": "ok",
        "openai": "unconfigured",
        "anthropic": "unconfigured",
        "gemini": "unconfigured",
    }
    assert health["last_run"]["finished_jobs"] and health["leader"]["owner"] == runtime.batch.worker.lease.owner
    assert (await client.get("/batch/alerts")).json() == []


async def test_alerts_start_once_and_the_savings_milestone_counts_levels(client, caplog):
    runtime = client.app.state.runtime
    alerts = runtime.batch.worker.alerts
    alerts.thresholds = type(alerts.thresholds)(max_queued_items=1, savings_step_usd=1e-9)
    body = {
        "name": "x",
        "provider": "local",
        "model": "gpt2",
        "kind": "generate",
        "requests": [prompt("a", "one"), prompt("b", "two")],
    }
    await client.post("/batch/jobs", json=body)
    started = await alerts.update()
    assert [a.type for a in started] == ["queue_backlog"]
    assert await alerts.update() == []
    assert metric("batch_alerts_active", type="queue_backlog") == 1
    listed = (await client.get("/batch/alerts")).json()
    assert [a["type"] for a in listed] == ["queue_backlog"] and listed[0]["since"] is not None
    await client.post("/batch/process/all")
    await runtime.batch.run_once()
    assert metric("batch_alerts_active", type="queue_backlog") == 0
    assert metric("batch_alerts_active", type="savings_milestone") == 1


@asynccontextmanager
async def webhook_receiver(failures: int = 0) -> AsyncIterator[tuple[int, list[tuple[bytes, str]]]]:
    """An HTTP server on loopback that answers 503 `failures` times, then records each POST /hook and its
    signature; yields its port and the records."""
    received: list[tuple[bytes, str]] = []
    failures_left = [failures]

    async def hook(request: web.Request) -> web.Response:
        if failures_left[0]:
            failures_left[0] -= 1
            return web.Response(status=503)
        received.append((await request.read(), request.headers.get("x-signature", "")))
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1], received
    finally:
        await runner.cleanup()


async def delivered(runtime, job_id: str) -> None:
    for _ in range(200):
        if (await runtime.batch.jobs.get(job_id)).webhook_state == "delivered":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the webhook of job {job_id} was not delivered within 4 s")


def hooked_app(settings, **update):
    return create_app(
        settings.model_copy(
            update={"batch_worker": "off", "webhook_allow_http": True, "webhook_allowed_hosts": "127.0.0.1", **update}
        )
    )


async def test_a_finished_job_calls_its_webhook_signed_with_the_secret(settings, tmp_path):
    app = hooked_app(settings, batch_webhook_secret="s3cret")
    async with webhook_receiver(failures=1) as (port, received), app.router.lifespan_context(app):
        runtime = app.state.runtime
        runtime.batch.worker.webhooks.backoff_s = 0.01
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {
                "name": "hooked",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "schedule": "now",
                "webhook_url": f"http://127.0.0.1:{port}/hook",
                "requests": [prompt("a", "hi")],
            }
            job = (await client.post("/batch/jobs", json=body)).json()
            await runtime.batch.run_once()
            await delivered(runtime, job["id"])
    [(payload, signature)] = received
    assert signature == "sha256=" + hmac.new(b"s3cret", payload, hashlib.sha256).hexdigest()
    summary = json.loads(payload)
    assert summary["job_id"] == job["id"] and summary["status"] == "completed"
    assert summary["event"] == "batch.job.finished"


async def test_a_delivery_that_fails_unexpectedly_is_counted_and_made_again_at_the_next_tick(settings, caplog):
    app = hooked_app(settings)
    async with webhook_receiver() as (port, received), app.router.lifespan_context(app):
        runtime = app.state.runtime
        webhooks = runtime.batch.worker.webhooks
        store, broken = webhooks._state, [1]

        async def state_write_with_a_bug(job_id: str, state: str) -> None:
            if broken:
                broken.pop()
                raise RuntimeError("a bug storing the delivery")
            await store(job_id, state)

        webhooks._state = state_write_with_a_bug
        before = metric("background_task_failures_total", task="webhook-sender")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {
                "name": "hooked",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "schedule": "now",
                "webhook_url": f"http://127.0.0.1:{port}/hook",
                "requests": [prompt("a", "hi")],
            }
            job = (await client.post("/batch/jobs", json=body)).json()
            await runtime.batch.run_once()
            for _ in range(200):
                if webhooks.status()["state"] == "restarting":
                    break
                await asyncio.sleep(0.02)
            health = runtime.batch.health()
            assert health["status"] == "degraded" and health["tasks"]["webhook-sender"]["state"] == "restarting"
            assert metric("background_task_failures_total", task="webhook-sender") - before == 1
            assert (
                "a bug storing the delivery" in caplog.text
                and (await runtime.batch.jobs.get(job["id"])).webhook_state == "pending"
            )
            await runtime.batch.run_once()
            await delivered(runtime, job["id"])
            assert runtime.batch.health()["tasks"]["webhook-sender"]["state"] == "running"
    # At least once: the first delivery reached the receiver before its outcome could be stored.
    assert [json.loads(payload)["job_id"] for payload, _ in received] == [job["id"], job["id"]]


@pytest.fixture
def settings(request, settings):
    scheduler = getattr(request, "param", None)
    return settings.model_copy(update={"generator_scheduler": scheduler}) if scheduler else settings


def hold_first_model_call(batcher) -> tuple[threading.Event, threading.Event]:
    """Hold the batcher's first model call (a static batch, or the continuous loop's first prefill)."""
    owner, name = (
        (batcher.generator.decoder, "prefill") if isinstance(batcher, ContinuousBatcher) else (batcher, "compute")
    )
    original, entered, release = getattr(owner, name), threading.Event(), threading.Event()

    def held(*args):
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return original(*args)

    setattr(owner, name, held)
    return entered, release


def interactive_waiting(batcher) -> int:
    waiting = batcher._waiting if isinstance(batcher, ContinuousBatcher) else batcher._queue
    return sum(not entry.background for entry in waiting)


@pytest.mark.parametrize("settings", ["continuous", "static"], indirect=True)
async def test_interactive_requests_wait_behind_at_most_one_background_batch(client):
    """A 500-item background job runs while interactive requests flow: the batcher's own record of how many
    background batches (continuous: background admissions) each interactive item waited behind never exceeds one."""
    runtime = client.app.state.runtime
    requests = [prompt(f"bg{i:03d}", f"background item {i}") for i in range(500)]
    job = (
        await client.post(
            "/batch/jobs",
            json={
                "name": "big",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "schedule": "now",
                "requests": requests,
            },
        )
    ).json()
    waited = {key: metric(f"scheduler_background_batches_waited_{key}", model="generator") for key in ("count", "sum")}
    over_one = metric("scheduler_background_batches_waited_count", model="generator") - metric(
        "scheduler_background_batches_waited_bucket", model="generator", le="1.0"
    )
    background = metric("scheduler_background_items_total", model="generator")
    batcher = runtime.generation.batcher
    entered, release = hold_first_model_call(batcher)
    running = asyncio.create_task(runtime.batch.run_once())
    await asyncio.to_thread(entered.wait, 30)
    first = [
        asyncio.create_task(client.post("/generate", json={"prompts": [f"first {i}"], "max_new_tokens": 4}))
        for i in range(3)
    ]
    await until(lambda: interactive_waiting(batcher) == 3, 5)
    release.set()
    assert [(await task).status_code for task in first] == [200, 200, 200]
    answered = 3
    while not running.done() and answered < 60:
        bodies = [{"prompts": [f"interactive {answered + i}"], "max_new_tokens": 4} for i in range(3)]
        responses = await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))
        assert all(r.status_code == 200 for r in responses)
        answered += len(responses)
    await running
    assert (await client.get(f"/batch/jobs/{job['id']}")).json()["status"] == "completed"
    observed = metric("scheduler_background_batches_waited_count", model="generator") - waited["count"]
    assert answered >= 3 and observed == answered
    assert metric("scheduler_background_batches_waited_sum", model="generator") - waited["sum"] >= 3
    assert (
        metric("scheduler_background_batches_waited_count", model="generator")
        - metric("scheduler_background_batches_waited_bucket", model="generator", le="1.0")
        == over_one
    )
    assert metric("scheduler_background_items_total", model="generator") - background == 500
    sizes = runtime.generation.batcher.background_max_size
    assert sizes == runtime.settings.batch_background_max_size


async def test_the_in_process_worker_finishes_a_job_without_waiting_for_its_poll_interval(settings):
    app = create_app(settings.model_copy(update={"batch_worker": "in-process", "batch_poll_interval_s": 3600}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {
                "name": "auto",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "schedule": "now",
                "requests": [prompt("a", "one"), prompt("b", "two")],
            }
            job = (await client.post("/batch/jobs", json=body)).json()
            for _ in range(500):
                if (await client.get(f"/batch/jobs/{job['id']}")).json()["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            done = (await client.get(f"/batch/jobs/{job['id']}")).json()
            assert done["status"] == "completed" and done["completed_at"].endswith("Z")
            assert (await client.get("/batch/scheduler")).json()["running"] is True


async def test_a_cancel_racing_the_finishing_tick_is_booked_cancelled(client):
    runtime = client.app.state.runtime
    job = (
        await client.post(
            "/batch/jobs",
            json={
                "name": "race",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "schedule": "now",
                "requests": [prompt("a", "The cat"), prompt("b", "A dog")],
            },
        )
    ).json()
    await runtime.batch.worker.run_once()
    while await runtime.batch.runner.run_available():
        await runtime.batch.runner.wait_idle()
    read_by_the_tick = await runtime.batch.jobs.get(job["id"])
    # The cancel's write lands between the finishing tick's read and its compare-and-set.
    async with runtime.sessions() as session, session.begin():
        await session.execute(update(BatchJob).where(BatchJob.id == job["id"]).values(cancel_requested=True))
    assert await finish_job(runtime.sessions, runtime.batch.prices, read_by_the_tick)
    done = (await client.get(f"/batch/jobs/{job['id']}")).json()
    assert done["status"] == "cancelled" and done["counts"]["succeeded"] == 2


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "x", "temperature": -4}, "temperature"),
        ({"prompt": "x", "top_p": -1}, "top_p"),
        ({"prompt": "x", "unknown": 1}, "unknown"),
    ],
)
async def test_local_bodies_follow_the_interactive_rules_at_acceptance(client, body, field):
    job = {
        "name": "v",
        "provider": "local",
        "model": "gpt2",
        "kind": "generate",
        "requests": [prompt("ok", "The cat"), {"custom_id": "bad", "body": body}],
    }
    refused = await client.post("/batch/jobs", json=job)
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "requests", 1, field] and error["msg"].startswith(f"request 'bad': {field}:")
    created = (await client.post("/batch/jobs", json={**job, "requests": job["requests"][:1]})).json()
    added = await client.post(f"/batch/jobs/{created['id']}/requests", json={"requests": job["requests"][1:]})
    assert added.status_code == 422 and added.json()["detail"][0]["loc"] == ["body", "requests", 0, field]


async def test_a_local_generate_job_must_name_the_served_model(client):
    job = {
        "name": "m",
        "provider": "local",
        "model": "llama-70b",
        "kind": "generate",
        "requests": [prompt("a", "The cat")],
    }
    refused = await client.post("/batch/jobs", json=job)
    assert refused.status_code == 422 and "llama-70b" in refused.json()["detail"][0]["msg"]
    served = (await client.get("/v1/models")).json()["data"][0]["id"]
    assert (await client.post("/batch/jobs", json={**job, "model": served})).status_code == 201
    # The configured id (GENERATOR_MODEL) names it too, as on /v1.
    configured = client.app.state.runtime.settings.generator_model
    assert configured != served
    assert (await client.post("/batch/jobs", json={**job, "model": configured})).status_code == 201

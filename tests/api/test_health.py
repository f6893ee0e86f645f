"""Readiness (/health) and liveness (/health/live) as a load balancer and an orchestrator see them."""

import asyncio
import time

import httpx
import pytest

from server.core.supervisor import RestartPolicy
from server.ml.decoding import DecodeBatch
from server.services.infra import health as health_module
from server.services.infra.health import Check
from server.services.scheduling.continuous import ContinuousBatcher
from tests.api.gates import Gate, until_queued
from tests.support.app import serving
from tests.support.metrics import metric
from tests.support.waiting import until


async def generate(client: httpx.AsyncClient, prompt: str, tokens: int = 4) -> httpx.Response:
    return await client.post("/generate", json={"prompts": [prompt], "max_new_tokens": tokens})


async def test_an_error_injected_once_fails_its_rows_with_500_and_later_requests_are_answered(settings, monkeypatch):
    async with serving(settings) as client:
        batcher = client.app.state.runtime.generation.batcher
        gate = Gate(batcher)
        before = metric("background_task_failures_total", task="batcher-generator")
        original, calls = DecodeBatch.extend, []

        def extend_failing_once(batch, other):
            calls.append(1)
            if len(calls) == 1:
                raise MemoryError("injected into DecodeBatch.extend")
            return original(batch, other)

        monkeypatch.setattr(DecodeBatch, "extend", extend_failing_once)
        first = asyncio.create_task(generate(client, "running row", 30))
        await gate.wait_entered()
        joining = [asyncio.create_task(generate(client, f"joining row {i}")) for i in range(3)]
        await until_queued(batcher, 3)
        gate.open.set()
        answers = await asyncio.gather(first, *joining)
        assert {answer.status_code for answer in answers} == {500}
        assert all("MemoryError: injected into DecodeBatch.extend" in a.json()["detail"] for a in answers)
        assert (await generate(client, "after the failure")).status_code == 200
        assert metric("background_task_failures_total", task="batcher-generator") - before == 1
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["checks"]["models"]["detail"]["generator"]["failures"] == 1


async def test_a_loop_failing_every_turn_makes_readiness_and_then_liveness_503(settings, monkeypatch):
    settings = settings.model_copy(update={"scheduler_loop_max_failures": 3})
    monkeypatch.setattr(ContinuousBatcher, "_park_or_resume", lambda self: 1 / 0)
    async with serving(settings) as client:
        batcher = client.app.state.runtime.generation.batcher
        batcher.supervisor.policy = RestartPolicy(backoff_s=0.01, window_s=60, give_up_after=3)
        assert (await client.get("/health/live")).status_code == 200
        for attempt in range(3):
            assert (await generate(client, f"attempt {attempt}")).status_code == 500
            await until(lambda: batcher.supervisor.state != "restarting", 10)
        ready, live = await client.get("/health"), await client.get("/health/live")
        assert ready.status_code == 503 and live.status_code == 503
        assert live.json()["checks"]["models"]["detail"]["generator"]["state"] == "failed"
        assert ready.json()["checks"]["models"]["status"] == "down"


async def test_a_forward_pass_held_beyond_the_stall_limit_makes_readiness_503_not_liveness(settings):
    async with serving(settings.model_copy(update={"scheduler_stall_s": 0.3})) as client:
        gate = Gate(client.app.state.runtime.generation.batcher)
        request = asyncio.create_task(generate(client, "held"))
        await gate.wait_entered()
        await asyncio.sleep(0.4)
        ready = await client.get("/health")
        assert ready.status_code == 503
        assert ready.json()["checks"]["models"]["detail"]["generator"]["stalled"] is True
        assert (await client.get("/health/live")).status_code == 200
        gate.open.set()
        assert (await request).status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_draining_makes_readiness_503_while_requests_are_served(app_client):
    app_client.app.state.runtime.health.draining = True
    ready = await app_client.get("/health")
    assert ready.status_code == 503 and ready.json()["checks"]["drain"]["status"] == "down"
    assert (await app_client.get("/health/live")).status_code == 200
    assert (await generate(app_client, "still served")).status_code == 200


async def test_a_registered_check_is_reported_and_a_hung_one_is_cut_at_the_check_limit(app_client, monkeypatch):
    monkeypatch.setattr(health_module, "CHECK_TIMEOUT_S", 0.2)

    async def hung() -> Check:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(5)  # a cancellation that takes its time does not delay the answer

    health = app_client.app.state.runtime.health
    health.ready["batch"] = lambda: asyncio.sleep(0, Check("ok", 0.0, {"queued": 3}))
    health.ready["hung"] = hung
    started = time.monotonic()
    ready = await app_client.get("/health")
    # Cut at 0.2 s, and far from the 5.2 s a wait for the cancellation would take (a loaded machine may take
    # a second over the rest of the request).
    assert time.monotonic() - started < 2.5
    assert ready.status_code == 503
    assert ready.json()["checks"]["batch"] == {"status": "ok", "latency_ms": 0.0, "detail": {"queued": 3}}
    assert ready.json()["checks"]["hung"]["status"] == "down"


async def test_liveness_is_never_rate_limited(settings):
    async with serving(settings.model_copy(update={"ingress_rate_limit": "2/minute"})) as client:
        for _ in range(5):
            assert (await client.get("/health/live")).status_code == 200


@pytest.mark.postgres
async def test_the_first_health_against_a_hung_database_is_bounded_at_the_check_limit(settings):
    from tests.support.servers import PostgresServer
    from tests.system.test_faults_database import hung

    server = PostgresServer().start()
    try:
        async with serving(
            settings.model_copy(update={"database_url": server.url(), "database_timeout_s": 10})
        ) as client:
            with hung(server):
                started = time.monotonic()
                ready = await client.get("/health")
                took = time.monotonic() - started
            assert ready.status_code == 503 and ready.json()["checks"]["database"]["status"] == "down"
            # Bounded by the check limit (2 s), not by DATABASE_TIMEOUT_S (10 s); the margin is a loaded machine's.
            assert took < health_module.CHECK_TIMEOUT_S + 4
    finally:
        server.destroy()


async def test_a_request_of_more_items_than_the_queue_holds_is_a_422_naming_the_limit(settings):
    async with serving(settings.model_copy(update={"scheduler_queue_limit": 2})) as client:
        response = await client.post("/predict", json={"texts": ["a", "b", "c"]})
        assert response.status_code == 422 and "SCHEDULER_QUEUE_LIMIT=2" in response.text
        assert (await client.post("/predict", json={"texts": ["a", "b"]})).status_code == 200

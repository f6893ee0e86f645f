"""Redis faults against the whole app: a hung (SIGSTOPped) Redis, a restarted one, an unreachable one."""

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from redis.asyncio import Redis

from server.core.config import Settings
from server.main import create_app
from tests.support.app import serving as serving_app
from tests.support.metrics import metric
from tests.support.redis import redis_answers_again
from tests.support.servers import RedisServer

WORKERS = 8
WINDOW_S = 1.0
ROUNDS = 3
# Probes a stall of under a minute can see: the breaker's interval doubles from 0.5 s after each one.
MAX_PROBES = 8


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


async def completed_in_window(client: httpx.AsyncClient, tag: str) -> int:
    """/predict requests answered 200 to `WORKERS` closed-loop clients within `WINDOW_S`. Every text is new
    (cacheable, never cached yet), so every app does the same model work whatever its cache."""
    loop = asyncio.get_running_loop()
    end = loop.time() + WINDOW_S

    async def worker(index: int) -> int:
        done = 0
        while loop.time() < end:
            response = await client.post("/predict", json={"text": f"{tag} {index} {done}"})
            assert response.status_code == 200, response.text
            done += 1
        return done

    return sum(await asyncio.gather(*(worker(i) for i in range(WORKERS))))


def redis_calls() -> tuple[float, float]:
    """(calls that reached Redis and failed, calls skipped by the open circuit) so far."""
    return metric("circuit_failures_total", dependency="redis"), metric("circuit_skipped_total", dependency="redis")


async def test_a_hung_redis_keeps_requests_flowing_at_the_no_redis_rate(settings, redis_server, tmp_path: Path):
    """Both apps cache and rate-limit (in memory, or in the stopped Redis). Their windows alternate, so the
    machine's drifting speed weighs on both alike."""
    limited = settings.model_copy(update={"ingress_rate_limit": "1000000/second"})
    on_redis = limited.model_copy(
        update={"redis_url": redis_server.url, "database_url": f"sqlite+aiosqlite:///{tmp_path / 'redis-app.db'}"}
    )
    async with serving(limited) as no_redis, serving(on_redis) as stalled:
        for client in (no_redis, stalled):
            await completed_in_window(client, "warm-up")
        assert (await stalled.post("/predict", json={"text": "warm-up 0 0"})).headers["x-cache"] == "HIT"
        failures, skipped = redis_calls()
        answered = {"no_redis": 0, "stalled": 0}
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            for round_ in range(ROUNDS):
                answered["no_redis"] += await completed_in_window(no_redis, f"round {round_}")
                answered["stalled"] += await completed_in_window(stalled, f"round {round_}")
            health = (await stalled.get("/health")).json()
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        failures, skipped = (now - before for now, before in zip(redis_calls(), (failures, skipped), strict=True))
    assert answered["stalled"] >= answered["no_redis"] / 2, answered
    # Requests in flight when Redis stopped each waited for one timeout, then only probes reached Redis.
    assert failures <= WORKERS + MAX_PROBES, (failures, answered)
    assert skipped >= answered["stalled"] - failures, "every other request skipped Redis (the cache and the limiter)"
    assert health["status"] == "degraded" and health["checks"]["redis"]["detail"]["circuit"] in ("open", "half_open")


async def test_a_stale_connection_after_a_redis_restart_does_not_fail_the_request(settings, redis_server):
    """RATE_LIMIT_FAIL_MODE=closed answers 503 when the limiter's Redis fails: a restart must not cause one."""
    closed = settings.model_copy(
        update={"redis_url": redis_server.url, "ingress_rate_limit": "1000/minute", "rate_limit_fail_mode": "closed"}
    )
    async with serving(closed) as client:
        assert (await client.post("/predict", json={"text": "before"})).status_code == 200
        failures = metric("circuit_failures_total", dependency="redis")
        redis_server.stop()
        redis_server.start()
        assert (await client.post("/predict", json={"text": "after"})).status_code == 200
        assert metric("circuit_failures_total", dependency="redis") == failures
        health = (await client.get("/health")).json()["checks"]["redis"]
        assert health["status"] == "ok" and health["detail"] == {"circuit": "closed"}


async def test_an_unreachable_redis_is_announced_once_at_start_and_the_server_serves(settings, tmp_path, caplog):
    down = RedisServer(tmp_path / "never-started")
    with caplog.at_level(logging.WARNING):
        async with serving(settings.model_copy(update={"redis_url": down.url})) as client:
            assert (await client.post("/predict", json={"text": "no redis"})).status_code == 200
    announced = [record for record in caplog.records if record.getMessage().startswith("REDIS_URL is set but")]
    assert len(announced) == 1 and announced[0].levelname == "WARNING"


async def test_locks_left_by_a_redis_stall_do_not_make_the_same_prompts_wait_for_their_ttl(settings, redis_server):
    """16 generations hold their stampede locks when Redis stops for 3 s; they finish meanwhile, so their releases
    fail. Once Redis answers again, the same prompts are answered without waiting for the locks' TTL (60 s).

    The 16 requests open 16 connections at once while the event loop serves them all: at the default 0.25 s
    connect timeout, a loaded machine timed one out, the circuit opened, and the requests it skipped took no lock.
    The releases fail whatever the timeout (Redis stays stopped until every response is in)."""
    on_redis = settings.model_copy(
        update={"redis_url": redis_server.url, "cache_lock_ttl_s": 60.0, "redis_timeout_s": 2.0}
    )
    observer = Redis.from_url(redis_server.url)
    prompts = [f"stalled story {i}" for i in range(16)]
    async with serving_app(on_redis) as client:
        # The torch thread held until every generation holds its lock.
        held = threading.Event()
        client.app.state.runtime.generation.batcher.executor.submit(held.wait, 30)
        first = [
            asyncio.create_task(client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 64}))
            for prompt in prompts
        ]
        for _ in range(300):
            if len(await observer.keys("lock:*")) == 16:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the generations did not all take their locks")
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            held.set()
            assert [response.status_code for response in await asyncio.gather(*first)] == [200] * 16
            await asyncio.sleep(3)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        await redis_answers_again(client)
        async with asyncio.timeout(20):
            again = await asyncio.gather(
                *(client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 64}) for prompt in prompts)
            )
        assert [response.status_code for response in again] == [200] * 16
        assert [a.json()[0]["completion"] for a in again] == [f.result().json()[0]["completion"] for f in first]
    await observer.aclose()

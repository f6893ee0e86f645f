"""Several server processes sharing one Redis: the cache's stampede lock holds across processes."""

import asyncio
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from server.bench.run import server_process
from tests.support.metrics import counted
from tests.support.servers import RedisServer, free_port
from tests.support.waiting import until

LOCK_TTL_S = 2.0


def items_computed(base_url: str) -> float:
    return counted(httpx.get(f"{base_url}/metrics").text, "model_items_total", 'model="generator"')


@pytest.fixture
def replicas(standins, redis_server: RedisServer, tmp_path: Path):
    """Two `python -m server serve` processes on one Redis (each with its own SQLite file)."""
    generator, classifier = standins
    with ExitStack() as stack:
        urls = []
        for name in ("a", "b"):
            port = free_port()
            env = {
                "GENERATOR_MODEL": str(generator),
                "SENTIMENT_MODEL": str(classifier),
                "MODEL_SOURCE": "local",
                "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / name}.db",
                "REDIS_URL": redis_server.url,
                "CACHE_LOCK_TTL_S": str(LOCK_TTL_S),
                "TORCH_NUM_THREADS": "1",
                "LOG_LEVEL": "warning",
                "INGRESS_RATE_LIMIT": "off",
            }
            url, _ = stack.enter_context(
                server_process(
                    [sys.executable, "-m", "server", "serve", "--port", str(port)], env, port, tmp_path / f"{name}.log"
                )
            )
            urls.append(url)
        yield urls


async def test_identical_requests_over_two_processes_compute_once(replicas):
    body = {"prompts": ["Two replicas, one computation"], "max_new_tokens": 8}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        responses = await asyncio.gather(*(client.post(f"{replicas[i % 2]}/generate", json=body) for i in range(200)))
    assert [r.status_code for r in responses] == [200] * 200
    texts = {r.json()[0]["generated_text"] for r in responses}
    assert len(texts) == 1
    assert sum(items_computed(url) for url in replicas) == 1


async def test_waiters_answer_when_the_lock_holder_process_dies(standins, redis_server, tmp_path):
    generator, classifier = standins
    common = {
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "REDIS_URL": redis_server.url,
        "CACHE_LOCK_TTL_S": str(LOCK_TTL_S),
        "TORCH_NUM_THREADS": "1",
        "LOG_LEVEL": "warning",
        "REQUEST_TIMEOUT_S": "120",
        "INGRESS_RATE_LIMIT": "off",
    }
    with ExitStack() as stack:
        (holder, holder_process), (waiter, _) = (
            stack.enter_context(
                server_process(
                    [sys.executable, "-m", "server", "serve", "--port", str(port)],
                    {**common, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/{n}.db"},
                    port,
                    tmp_path / f"{n}.log",
                )
            )
            for n, port in (("holder", free_port()), ("waiter", free_port()))
        )
        target = {"prompts": ["The holder dies holding this"], "max_new_tokens": 4}
        observer = Redis.from_url(redis_server.url)
        async with httpx.AsyncClient(timeout=120) as client:
            # Sampled without a seed, the backlog is not cached and takes no lock: the target's is the only one.
            backlog = [
                asyncio.create_task(
                    client.post(
                        f"{holder}/generate",
                        json={"prompts": [f"busy {i} {j}" for j in range(32)], "max_new_tokens": 256, "temperature": 1},
                    )
                )
                for i in range(10)
            ]

            # Each step waits for what it needs rather than a fixed time, which a loaded machine may exceed: the
            # holder's model is busy with rows waiting behind, then the holder holds the target's lock.
            async def queued() -> bool:
                page = (await client.get(f"{holder}/metrics")).text
                return counted(page, "scheduler_queue_depth", "generator") >= 32

            await until(queued, 60, 0.05)
            doomed = asyncio.create_task(client.post(f"{holder}/generate", json=target))
            await until(lambda: observer.keys("lock:*"), 60, 0.05)
            started = time.monotonic()
            waiting = asyncio.create_task(client.post(f"{waiter}/generate", json=target))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            holder_process.kill()
            answer = await waiting
            elapsed = time.monotonic() - started
            await asyncio.gather(doomed, *backlog, return_exceptions=True)
        await observer.aclose()
        assert answer.status_code == 200 and answer.json()[0]["cached"] is False
        assert items_computed(waiter) == 1
        assert elapsed < LOCK_TTL_S + 30


async def test_four_processes_sharing_redis_admit_exactly_burst_plus_rate_times_duration(
    standins, redis_server, tmp_path
):
    burst, rate, duration_s = 5, 10, 3.0
    generator, classifier = standins
    with ExitStack() as stack:
        urls = []
        for n in range(4):
            port = free_port()
            env = {
                "GENERATOR_MODEL": str(generator),
                "SENTIMENT_MODEL": str(classifier),
                "MODEL_SOURCE": "local",
                "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/{n}.db",
                "REDIS_URL": redis_server.url,
                "INGRESS_RATE_LIMIT": f"{rate}/second;burst={burst}",
                "TORCH_NUM_THREADS": "1",
                "LOG_LEVEL": "warning",
            }
            url, _ = stack.enter_context(
                server_process(
                    [sys.executable, "-m", "server", "serve", "--port", str(port)], env, port, tmp_path / f"{n}.log"
                )
            )
            urls.append(url)
        statuses: list[int] = []
        sent_at: list[float] = []
        answered_at: list[float] = []

        async def hammer(client: httpx.AsyncClient, url: str, stop_at: float) -> None:
            while time.monotonic() < stop_at:
                sent_at.append(time.monotonic())
                statuses.append((await client.get(f"{url}/history", params={"limit": 1})).status_code)
                answered_at.append(time.monotonic())

        async with httpx.AsyncClient(timeout=30) as client:
            stop_at = time.monotonic() + duration_s
            await asyncio.gather(*(hammer(client, urls[i % 4], stop_at) for i in range(8)))
    assert set(statuses) == {200, 429}
    # Redis decides each request somewhere between its sending and its answer, so the span of decisions
    # lies between these two spans; on a loaded machine a request can take 100 ms or more.
    shortest = max(sent_at) - min(answered_at)
    longest = max(answered_at) - min(sent_at)
    admitted = statuses.count(200)
    assert burst + rate * shortest - 1 <= admitted <= burst + rate * longest + 1

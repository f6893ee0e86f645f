"""Counting and removing cached answers by endpoint and model, in memory and on Redis (SCAN + UNLINK in batches)."""

import asyncio

import pytest

from server.services.cache import MemoryStore, RedisStore, ResponseCache
from server.services.cache.keys import cache_key
from server.services.infra.redis_client import open_redis

ENTRIES = {("generate", "gpt2"): 700, ("generate", "gpt2-large"): 5, ("predict", "sst2"): 600}


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest):
    if request.param == "memory":
        yield ResponseCache(MemoryStore(max_items=10_000, ttl_s=60), lock_ttl_s=5)
        return
    client = open_redis(request.getfixturevalue("redis_server").url)
    await client.set("ratelimit:someone", b"1")  # not a cached answer: never counted, never removed
    yield ResponseCache(RedisStore(client, ttl_s=60, lock_ttl_s=5), lock_ttl_s=5)
    assert await client.get("ratelimit:someone") == b"1"
    await client.aclose()


async def fill(cache: ResponseCache) -> None:
    for (endpoint, model), count in ENTRIES.items():
        for index in range(count):
            await cache.store.set(cache_key(endpoint, model, "rev", f"input {index}", {}), b"answer")


async def test_entries_are_counted_and_removed_by_endpoint_and_model(cache):
    await fill(cache)
    assert await cache.entries() == 1305
    assert await cache.entries("generate") == 705
    assert await cache.entries(model="sst2") == 600
    assert await cache.remove("generate", "gpt2-large") == 5
    assert await cache.remove("predict", "gpt2") == 0
    assert await cache.remove("generate") == 700  # more than one SCAN batch
    assert await cache.entries() == 600
    assert await cache.remove() == 600
    assert await cache.entries() == 0


async def test_hit_ratio_counts_items_served_without_computing(cache):
    assert cache.hit_ratio is None

    async def compute(index: int) -> bytes:
        return b"x"

    await cache.resolve("predict", ["a", "b", None], compute)
    await cache.resolve("predict", ["a", "b"], compute)
    assert cache.hit_ratio == pytest.approx(2 / 4)  # the uncacheable item is not counted


async def test_a_failed_holder_wakes_the_other_processes_waiters(redis_server):
    """The lock holder's computation fails: a waiter elsewhere takes over at once, not at the lock's expiry (60 s)."""
    clients = [open_redis(redis_server.url) for _ in range(2)]
    holder, waiter = (ResponseCache(RedisStore(client, ttl_s=60, lock_ttl_s=60), lock_ttl_s=60) for client in clients)
    started = asyncio.Event()

    async def fail(index: int) -> bytes:
        started.set()
        await asyncio.sleep(0.3)
        raise RuntimeError("the provider failed")

    async def succeed(index: int) -> bytes:
        return b"computed by the waiter"

    try:
        failing = asyncio.create_task(holder.resolve("analyze", ["report"], fail))
        await started.wait()
        async with asyncio.timeout(20):
            [(value, outcome)] = await waiter.resolve("analyze", ["report"], succeed)
        assert (value, outcome) == (b"computed by the waiter", "miss")
        with pytest.raises(RuntimeError):
            await failing
    finally:
        for client in clients:
            await client.aclose()

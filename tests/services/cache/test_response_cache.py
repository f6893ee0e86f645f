import asyncio
import os
import signal
from contextlib import contextmanager

import pytest

from server.services.cache import MemoryStore, RedisStore, ResponseCache
from server.services.cache.redis_store import done_channel, lock_key
from server.services.errors import DeadlineExceeded
from server.services.infra.circuit import CircuitBreaker
from server.services.infra.redis_client import REDIS_FAILURES, open_redis
from tests.support.clock import Clock
from tests.support.metrics import metric
from tests.support.waiting import until


class Computation:
    """Counts computations; each takes `delay_s`."""

    def __init__(self, delay_s: float = 0.05):
        self.delay_s = delay_s
        self.calls = 0
        self.started = asyncio.Event()

    async def __call__(self, index: int) -> bytes:
        self.calls += 1
        self.started.set()
        await asyncio.sleep(self.delay_s)
        return f"value-{index}".encode()


@pytest.fixture
async def redis(redis_server):
    client = open_redis(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest):
    if request.param == "memory":
        yield ResponseCache(MemoryStore(max_items=100, ttl_s=60), lock_ttl_s=5)
        return
    client = open_redis(request.getfixturevalue("redis_server").url)
    yield ResponseCache(RedisStore(client, ttl_s=60, lock_ttl_s=5), lock_ttl_s=5)
    await client.aclose()


async def test_concurrent_identical_items_compute_once_then_hit(cache):
    compute = Computation()
    answers = await asyncio.gather(*(cache.resolve("t", ["k"], compute) for _ in range(20)))
    assert compute.calls == 1
    assert {a[0][0] for a in answers} == {b"value-0"}
    assert sorted(a[0][1] for a in answers) == ["coalesced"] * 19 + ["miss"]
    assert await cache.resolve("t", ["k"], compute) == [(b"value-0", "hit")]
    assert compute.calls == 1


async def test_items_of_one_request_are_resolved_separately(cache):
    compute = Computation(0)
    await cache.resolve("t", ["a"], compute)
    answers = await cache.resolve("t", ["a", "b", None], compute)
    assert [outcome for _, outcome in answers] == ["hit", "miss", "bypass"]
    assert compute.calls == 3
    before = metric("cache_requests_total", endpoint="t", result="bypass")
    await cache.resolve("t", [None], compute)
    assert compute.calls == 4 and metric("cache_requests_total", endpoint="t", result="bypass") == before + 1


async def test_bypass_recomputes_and_refreshes_the_entry(cache):
    compute = Computation(0)
    await cache.resolve("t", ["k"], compute)
    assert (await cache.resolve("t", ["k"], compute, bypass=True))[0][1] == "bypass"
    assert compute.calls == 2
    assert (await cache.resolve("t", ["k"], compute))[0][1] == "hit"


async def test_a_caller_leaving_does_not_cancel_the_computation_for_the_others(cache):
    started, release, calls = asyncio.Event(), asyncio.Event(), []

    async def compute(index: int) -> bytes:
        calls.append(index)
        started.set()
        await release.wait()
        return b"value"

    leaving = asyncio.create_task(cache.resolve("t", ["k"], compute))
    await started.wait()
    staying = asyncio.create_task(cache.resolve("t", ["k"], compute))
    # The first caller leaves once the second has joined (on Redis, after a lookup that a loaded machine delays).
    await until(lambda: cache._flights["k"].waiters == 2, 5)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    release.set()
    assert (await staying)[0][0] == b"value"
    assert calls == [0]


async def test_the_last_caller_leaving_cancels_the_computation(cache):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def compute(index: int) -> bytes:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    only = asyncio.create_task(cache.resolve("t", ["k"], compute))
    await started.wait()
    only.cancel()
    await asyncio.wait_for(cancelled.wait(), 2)


async def test_a_failed_computation_reaches_every_caller_and_is_not_cached(cache):
    async def boom(index: int) -> bytes:
        await asyncio.sleep(0.02)
        raise RuntimeError("model failed")

    results = await asyncio.gather(*(cache.resolve("t", ["k"], boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    compute = Computation(0)
    assert (await cache.resolve("t", ["k"], compute))[0] == (b"value-0", "miss")


async def test_processes_sharing_redis_compute_once(redis_server):
    """Two caches with their own Redis clients stand for two server processes. A generous timeout: the test is
    about the lock, and 40 connections opened at once on a loaded 2-core machine can exceed the 0.25 s default."""
    clients = [open_redis(redis_server.url, timeout_s=5) for _ in range(2)]
    stores = [RedisStore(client, ttl_s=60, lock_ttl_s=5) for client in clients]
    caches = [ResponseCache(store, lock_ttl_s=5) for store in stores]
    compute = Computation(0.3)
    answers = await asyncio.gather(*(caches[i % 2].resolve("t", ["shared"], compute) for i in range(40)))
    assert compute.calls == 1
    assert {a[0][0] for a in answers} == {b"value-0"}
    assert sum(a[0][1] == "miss" for a in answers) == 1
    for client in clients:
        await client.aclose()


async def test_waiters_take_over_when_the_lock_holder_died(redis):
    store = RedisStore(redis, ttl_s=60, lock_ttl_s=0.5)
    cache = ResponseCache(store, lock_ttl_s=0.5)
    await store.client.set(lock_key("orphan"), "dead-holder-token", px=500)
    compute = Computation(0)
    assert await asyncio.wait_for(cache.resolve("t", ["orphan"], compute), 3) == [(b"value-0", "miss")]
    assert compute.calls == 1


async def test_the_lock_is_released_only_by_its_holder(redis):
    store = RedisStore(redis, ttl_s=60, lock_ttl_s=5)
    token = await store.try_lock("k")
    assert token and await store.try_lock("k") is None
    await store.release("k", "someone-else")
    assert await store.client.get(lock_key("k")) == token.encode()
    await store.store_and_release("k", b"v", token)
    assert await store.client.get(lock_key("k")) is None and await store.client.get("k") == b"v"


async def test_redis_down_computes_counts_skips_redis_then_recovers(redis_server, redis):
    clock = Clock()
    redis.circuit = CircuitBreaker("redis", failures=REDIS_FAILURES, clock=clock)
    cache = ResponseCache(RedisStore(redis, ttl_s=60, lock_ttl_s=5), lock_ttl_s=5)
    compute = Computation(0)
    await cache.resolve("t", ["before"], compute)
    redis_server.stop()
    errors = metric("cache_store_errors_total", backend="redis", operation="get")
    outcomes = await asyncio.gather(*(cache.resolve("t", ["down"], compute) for _ in range(5)))
    assert {value for [(value, _)] in outcomes} == {b"value-0"}
    assert sorted(outcome for [(_, outcome)] in outcomes) == ["coalesced"] * 4 + ["error"]
    assert compute.calls == 2
    assert metric("cache_store_errors_total", backend="redis", operation="get") > errors
    redis_server.start()
    failures, skipped = (
        metric("circuit_failures_total", dependency="redis"),
        metric("circuit_skipped_total", dependency="redis"),
    )
    assert await cache.resolve("t", ["after"], compute) == [(b"value-0", "error")], "skipped: Redis is not tried yet"
    assert metric("circuit_skipped_total", dependency="redis") == skipped + 2, "the lookup and the lock"
    assert metric("circuit_failures_total", dependency="redis") == failures
    clock.now += redis.circuit.interval_s
    assert (await cache.resolve("t", ["after"], compute))[0][1] == "miss"
    assert redis.circuit.state == "closed"
    assert (await cache.resolve("t", ["after"], compute))[0][1] == "hit"


async def test_waiting_for_another_process_is_not_cut_by_the_socket_timeout(redis_server):
    """The stampede wait sleeps on the subscription, far longer than REDIS_TIMEOUT_S (0.2 s: a loaded machine can
    take longer than 0.05 s over an ordinary command)."""
    clients = [open_redis(redis_server.url, timeout_s=0.2) for _ in range(2)]
    caches = [ResponseCache(RedisStore(client, ttl_s=60, lock_ttl_s=5), lock_ttl_s=5) for client in clients]
    compute = Computation(1.0)
    leader = asyncio.create_task(caches[0].resolve("t", ["slow"], compute))
    await compute.started.wait()
    assert await caches[1].resolve("t", ["slow"], compute) == [(b"value-0", "coalesced")]
    assert await leader == [(b"value-0", "miss")]
    assert compute.calls == 1 and all(client.circuit.state == "closed" for client in clients)
    for client in clients:
        await client.aclose()


async def test_a_joiner_keeps_its_own_deadline(cache):
    """The first caller's computation runs for seconds; a caller that joins it with a short deadline gets
    `DeadlineExceeded` on its own terms, and the computation carries on for the first."""
    compute = Computation(5)
    first = asyncio.create_task(cache.resolve("t", ["slow"], compute, background=True, timeout_s=60))
    await compute.started.wait()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(cache.resolve("t", ["slow"], Computation(5), timeout_s=0.2), 2)
    assert not first.done() and compute.calls == 1
    first.cancel()


async def test_an_interactive_joiner_submits_its_own_item_to_promote_a_background_computation(cache):
    """Its own submit is what the batcher merges with the background item and runs at interactive priority;
    a background joiner, like an interactive joiner of an interactive computation, only waits."""
    background = Computation(5)
    first = asyncio.create_task(cache.resolve("t", ["k"], background, background=True))
    await background.started.wait()
    waiter = Computation(0)
    second = asyncio.create_task(cache.resolve("t", ["k"], waiter, background=True, timeout_s=0.2))
    interactive = Computation(0)
    assert await asyncio.wait_for(cache.resolve("t", ["k"], interactive), 2) == [(b"value-0", "coalesced")]
    assert interactive.calls == 1 and waiter.calls == 0 and background.calls == 1
    with pytest.raises(DeadlineExceeded):
        await second
    first.cancel()


async def test_only_items_that_start_a_computation_take_queue_room(cache):
    """Callers joining a computation in flight (and repeats within a request) reserve nothing in the batcher."""
    compute = Computation(0.3)
    admitted: list[int] = []

    @contextmanager
    def admit(count: int):
        admitted.append(count)
        yield

    first = asyncio.create_task(cache.resolve("t", ["k"], compute, admit=admit))
    await compute.started.wait()
    await asyncio.gather(first, cache.resolve("t", ["k", "k", "other", None], compute, admit=admit))
    assert admitted == [1, 2]


async def test_waiters_on_many_keys_share_one_connection_and_leave_the_pool_to_commands(redis_server):
    """64 keys wait on another process's locks; the pool holds 64 connections, so a waiter holding a pooled
    connection each would starve the commands (they would wait the 2 s timeout for one) and open the circuit."""
    holder_client, waiting_client = open_redis(redis_server.url, timeout_s=5), open_redis(redis_server.url, timeout_s=2)
    holder = RedisStore(holder_client, ttl_s=60, lock_ttl_s=30)
    cache = ResponseCache(RedisStore(waiting_client, ttl_s=60, lock_ttl_s=30), lock_ttl_s=30)
    keys = [f"held-{i}" for i in range(64)]
    tokens = [await holder.try_lock(key) for key in keys]
    compute = Computation(0)
    waiting = [asyncio.create_task(cache.resolve("t", [key], compute)) for key in keys]
    for _ in range(200):
        if sum(await holder_client.pubsub_numsub(*(f"done:{key}" for key in keys)), ()).count(1) == 64:
            break
        await asyncio.sleep(0.05)
    pools = waiting_client.connection_pool
    assert await waiting_client.set("other", b"command") and await waiting_client.get("other") == b"command"
    assert len(pools._in_use_connections) <= 2, "the waiters' subscriptions share one connection"
    for key, token in zip(keys, tokens, strict=True):
        await holder.store_and_release(key, b"theirs", token)
    answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert {answer[0] for answer in answers} == {(b"theirs", "coalesced")} and compute.calls == 0
    assert waiting_client.circuit.state == "closed"
    for client in (holder_client, waiting_client):
        await client.aclose()


async def test_a_lock_left_by_a_redis_stall_is_settled_when_the_circuit_closes(redis_server):
    """The holder's release fails while Redis is stopped; once Redis answers again, neither this process's next
    caller nor another process's waiter sleeps until the lock's TTL (30 s)."""
    clock = Clock()
    holder_client, other_client = open_redis(redis_server.url), open_redis(redis_server.url, timeout_s=5)
    holder_client.circuit = CircuitBreaker("redis", failures=REDIS_FAILURES, clock=clock)
    holder = ResponseCache(RedisStore(holder_client, ttl_s=60, lock_ttl_s=30), lock_ttl_s=30)
    other = ResponseCache(RedisStore(other_client, ttl_s=60, lock_ttl_s=30), lock_ttl_s=30)
    compute = Computation(1.0)
    first = [asyncio.create_task(holder.resolve("t", [key], compute)) for key in ("mine", "theirs")]
    # Redis stops while both hold their locks and compute: not before the second lock (a loaded machine can take
    # longer than a fixed wait over it), nor after a computation ends.
    await until(lambda: compute.calls >= 2, 10, 0.005)
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        assert [answer[0][1] for answer in await asyncio.gather(*first)] == ["miss", "miss"]
        assert holder_client.circuit.state == "open"
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert await other_client.exists(lock_key("mine"), lock_key("theirs")) == 2, "both releases failed"
    waiter = asyncio.create_task(other.resolve("t", ["theirs"], compute))

    # The other process waits on the lock's channel before this one settles it (not after a fixed 0.2 s).
    async def subscribed() -> bool:
        return (await other_client.pubsub_numsub(done_channel("theirs")))[0][1] == 1

    await until(subscribed, 10)
    clock.now += holder_client.circuit.interval_s
    assert await asyncio.wait_for(holder.resolve("t", ["mine"], compute), 3) == [(b"value-0", "coalesced")]
    assert await asyncio.wait_for(waiter, 3) == [(b"value-0", "coalesced")]
    assert compute.calls == 2
    for client in (holder_client, other_client):
        await client.aclose()

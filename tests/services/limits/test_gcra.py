import asyncio

import pytest

from server.core.rate_policy import RatePolicy
from server.services.infra.redis_client import open_redis
from server.services.limits.gcra import MemoryLimiter, RedisLimiter
from tests.support.clock import Clock


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest):
    if request.param == "memory":
        yield MemoryLimiter()
        return
    client = open_redis(request.getfixturevalue("redis_server").url)
    yield RedisLimiter(client)
    await client.aclose()


async def test_burst_then_one_per_interval_with_exact_retry_after():
    clock = Clock(1000.0)
    limiter = MemoryLimiter(clock)
    policy = RatePolicy("p", 2, 1, 3)
    decisions = [await limiter.check([(policy, "c")]) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.states[0].remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].retry_after_s == pytest.approx(0.5)
    clock.now += 0.499
    assert not (await limiter.check([(policy, "c")])).allowed
    clock.now += 0.001
    assert (await limiter.check([(policy, "c")])).allowed
    clock.now += 10
    assert [(await limiter.check([(policy, "c")])).allowed for _ in range(4)] == [True, True, True, False]


async def test_admits_burst_plus_rate_times_elapsed():
    clock = Clock(1000.0)
    limiter = MemoryLimiter(clock)
    policy = RatePolicy("p", 10, 1, 5)
    admitted = 0
    for step in range(3001):
        clock.now = 1000.0 + step / 1000
        admitted += (await limiter.check([(policy, "c")])).allowed
    assert admitted == 5 + 10 * 3


async def test_policies_are_all_or_nothing(limiter):
    wide, narrow = RatePolicy("wide", 100, 60, 100), RatePolicy("narrow", 1, 60, 1)
    assert (await limiter.check([(wide, "w"), (narrow, "n")])).allowed
    denied = await limiter.check([(wide, "w"), (narrow, "n")])
    assert not denied.allowed and denied.denied_by == ["narrow"]
    assert denied.states[0].remaining == 99, "a refused request must not consume the other policies"
    assert (await limiter.check([(wide, "w")])).states[0].remaining == 98


async def test_keys_are_independent(limiter):
    policy = RatePolicy("p", 1, 60, 1)
    assert (await limiter.check([(policy, "a")])).allowed
    assert (await limiter.check([(policy, "b")])).allowed
    assert not (await limiter.check([(policy, "a")])).allowed


async def test_a_retry_after_the_announced_delay_passes(limiter):
    policy = RatePolicy("p", 5, 1, 1)
    assert (await limiter.check([(policy, "r")])).allowed
    denied = await limiter.check([(policy, "r")])
    assert not denied.allowed and 0 < denied.retry_after_s <= 0.2
    await asyncio.sleep(denied.retry_after_s)
    assert (await limiter.check([(policy, "r")])).allowed

import pytest

from server.core.rate_policy import RatePolicy
from server.services.infra.redis_client import open_redis
from server.services.limits.egress import EgressGuard, EgressLimited
from server.services.limits.gcra import MemoryLimiter, RedisLimiter
from tests.support.metrics import metric


def guard(limiter, fail_open: bool = True) -> EgressGuard:
    return EgressGuard(limiter, {"gemini": RatePolicy("gemini", 10, 1, 2)}, fail_open=fail_open)


async def test_quota_is_global_and_refusals_say_when_to_retry():
    egress = guard(MemoryLimiter())
    assert (await egress.check("gemini")).allowed and (await egress.check("gemini")).allowed
    refused = await egress.check("gemini")
    assert not refused.allowed and 0 < refused.retry_after_s <= 0.1
    with pytest.raises(EgressLimited) as limited:
        await egress.acquire("gemini")
    assert limited.value.provider == "gemini" and limited.value.retry_after_s > 0
    await egress.acquire("gemini", wait_s=1.0)
    assert await egress.check("unlisted-provider") is None


async def test_replicas_share_the_quota_through_redis(redis_server):
    clients = [open_redis(redis_server.url) for _ in range(2)]
    guards = [guard(RedisLimiter(client)) for client in clients]
    allowed = [(await guards[i % 2].check("gemini")).allowed for i in range(4)]
    assert allowed == [True, True, False, False]
    for client in clients:
        await client.aclose()


async def test_store_failure_fails_open_or_closed_as_configured(redis_server):
    client = open_redis(redis_server.url)
    redis_server.stop()
    errors = metric("rate_limit_errors_total", layer="egress")
    assert await guard(RedisLimiter(client), fail_open=True).check("gemini") is None
    with pytest.raises(EgressLimited):
        await guard(RedisLimiter(client), fail_open=False).check("gemini")
    assert metric("rate_limit_errors_total", layer="egress") == errors + 2
    await client.aclose()

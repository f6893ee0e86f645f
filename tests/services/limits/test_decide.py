import logging

import pytest

from server.core.rate_policy import RatePolicy
from server.core.throttled_log import ThrottledLog
from server.services.infra.redis_client import open_redis
from server.services.limits import decide as decide_module
from server.services.limits.decide import LimiterUnavailable, decide
from server.services.limits.gcra import RedisLimiter
from tests.support.clock import Clock
from tests.support.metrics import metric

POLICY = RatePolicy("p", 10, 1, 10)


async def test_a_down_store_is_counted_every_time_and_logged_once_per_interval_per_layer(
    redis_server, caplog, monkeypatch
):
    clock = Clock()
    monkeypatch.setattr(decide_module, "_warnings", ThrottledLog(decide_module.log, clock=clock))
    client = open_redis(redis_server.url)
    limiter = RedisLimiter(client)
    redis_server.stop()
    errors = metric("rate_limit_errors_total", layer="ingress")
    with caplog.at_level(logging.WARNING, logger=decide_module.log.name):
        for _ in range(20):
            assert await decide(limiter, [(POLICY, "k")], layer="ingress", fail_open=True) is None
        with pytest.raises(LimiterUnavailable):
            await decide(limiter, [(POLICY, "k")], layer="egress", fail_open=False)
        clock.now += 30
        assert await decide(limiter, [(POLICY, "k")], layer="ingress", fail_open=True) is None
    assert metric("rate_limit_errors_total", layer="ingress") == errors + 21
    lines = [record.getMessage() for record in caplog.records if record.name == decide_module.log.name]
    assert len(lines) == 3, lines
    assert lines[0].startswith("ingress rate limiter failed (ConnectionError") and "failing open" in lines[0]
    assert lines[1].startswith("egress rate limiter failed (CircuitOpen") and "failing closed" in lines[1]
    assert "19 similar suppressed" in lines[2]
    await client.aclose()

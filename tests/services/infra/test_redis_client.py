import logging
import os
import signal

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError

from server.services.infra.redis_client import open_redis, warn_if_unreachable
from tests.support.metrics import metric
from tests.support.servers import RedisServer


async def connections_received(server: RedisServer) -> int:
    """Connections Redis has accepted, this one included. Redis accepts its backlog in order, so every
    connection made before this one is counted."""
    observer = Redis.from_url(server.url)
    try:
        return int((await observer.info("stats"))["total_connections_received"])
    finally:
        await observer.aclose()


async def test_a_pooled_connection_closed_by_a_restart_is_retried_once(redis_server):
    client = open_redis(redis_server.url)
    await client.set("k", "v")
    failures = metric("circuit_failures_total", dependency="redis")
    redis_server.stop()
    redis_server.start()
    assert await client.get("k") is None, "answered by the restarted (empty) Redis on a fresh connection"
    assert client.circuit.state == "closed"
    assert metric("circuit_failures_total", dependency="redis") == failures
    await client.aclose()


async def test_a_hung_redis_costs_one_timeout_without_a_retry(redis_server):
    client = open_redis(redis_server.url, timeout_s=0.2)
    await client.ping()
    before = await connections_received(redis_server)
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError):
            await client.get("k")
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert await connections_received(redis_server) == before + 1, "a retry would have opened a connection"
    assert client.circuit.state == "open"
    await client.aclose()


async def test_an_unreachable_redis_is_announced_once(redis_server, caplog):
    client = open_redis(redis_server.url)
    with caplog.at_level(logging.WARNING, logger="server.services.infra.redis_client"):
        await warn_if_unreachable(client)
        assert caplog.records == [], "Redis answers: nothing to say"
        redis_server.stop()
        await warn_if_unreachable(client)
    [record] = [record for record in caplog.records if record.name == "server.services.infra.redis_client"]
    assert record.getMessage().startswith("REDIS_URL is set but Redis does not answer (ConnectionError")
    await client.aclose()

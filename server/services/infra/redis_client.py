"""The one Redis client of a server process, shared by the cache, the stampede lock, the rate limiter and /health.

Redis is an accelerator: every user has a fallback, so the client fails fast rather than making a request
wait. Every command goes through the process's circuit breaker (`client.circuit`, see
server/services/infra/circuit.py): a hung or dead Redis costs one `timeout_s` per breaker interval, and calls in
between raise `CircuitOpen` at once. Socket reads, writes, connects and the wait for a pooled connection
each time out after `timeout_s` (REDIS_TIMEOUT_S). A command that fails with a connection error is retried
once on a fresh connection (a pooled connection that a Redis restart closed), never after a timeout (a
hung Redis must not double the wait).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from server.core.config import Settings
from server.services.infra.circuit import CircuitBreaker, CircuitOpen

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT_S: float = Settings.model_fields["redis_timeout_s"].default
# What trips the breaker: Redis did not answer. An error reply (ResponseError) is an answer.
REDIS_FAILURES = (ConnectionError, TimeoutError, OSError, asyncio.TimeoutError)
# What a caller with a fallback catches: no answer, an error reply, or skipped by the breaker.
REDIS_ERRORS = (RedisError, CircuitOpen, OSError, asyncio.TimeoutError)


class GuardedRedis(Redis):
    """redis.asyncio.Redis whose commands pass through `circuit` (pub/sub subscriptions are guarded by their
    callers: their connection is the subscription's own)."""

    circuit: CircuitBreaker
    # What else holds this client's connections (the stampede lock's shared subscription): closed first.
    closers: list[Callable[[], Awaitable[None]]]

    async def execute_command(self, *args, **options):
        async with self.circuit.guard():
            return await super().execute_command(*args, **options)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        for close in self.closers:
            await close()
        await super().aclose(close_connection_pool)


def open_redis(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> GuardedRedis:
    """A client on its own pool and breaker; queues bursts for a connection (up to `timeout_s`) instead of
    failing them with "Too many connections"."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
    )
    # redis-py types `from_pool` as returning `Redis`, though it builds an instance of the class it is called on.
    client = cast(GuardedRedis, GuardedRedis.from_pool(pool))
    client.circuit = CircuitBreaker("redis", failures=REDIS_FAILURES)
    client.closers = []
    return client


async def warn_if_unreachable(client: GuardedRedis) -> None:
    """One warning at startup when Redis is configured but does not answer; the server starts anyway."""
    try:
        await client.ping()
    except REDIS_ERRORS as exc:
        log.warning(
            "REDIS_URL is set but Redis does not answer (%s: %s): starting without it; requests are "
            "computed without the shared cache and rate limits follow RATE_LIMIT_FAIL_MODE until it answers",
            type(exc).__name__,
            exc,
        )

"""Readiness checks for load balancers: each check reports its state and how long it took.

The database is required (`down` fails the server's health); Redis only speeds things up, so a Redis
failure is `degraded`: requests are still served, computed without the shared cache. Records piling up
(the last write failed, or the backlog is not shrinking) are `degraded` too, never `down`: answers do not
wait for records, and the database check owns `down`.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.services.records import RecordWriter
from server.services.redis_client import GuardedRedis

CHECK_TIMEOUT_S = 2.0


@dataclass
class Check:
    status: str
    latency_ms: float
    detail: dict = field(default_factory=dict)


async def _probe(run: Callable[[], Awaitable[None]], failed: str, detail: dict) -> Check:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await run()
    except Exception as exc:
        return Check(failed, (time.perf_counter() - started) * 1000, {**detail, "error": f"{type(exc).__name__}: {exc}"})
    return Check("ok", (time.perf_counter() - started) * 1000, detail)


async def database_check(engine: AsyncEngine) -> Check:
    async def select_one() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return await _probe(select_one, "down", {"backend": engine.dialect.name})


async def redis_check(redis: GuardedRedis) -> Check:
    """The ping passes through Redis's circuit breaker: while it is open the check answers `degraded` without
    touching the network, and once its interval is over the ping may be the probe that closes it.
    `detail.circuit` is the breaker's state after the ping (closed, open, half_open)."""
    async def ping() -> None:
        await redis.ping()

    check = await _probe(ping, "degraded", {})
    check.detail["circuit"] = redis.circuit.state
    return check


def records_check(writer: RecordWriter) -> Check:
    """The record writer's state, without touching the database (see `RecordsStatus` for `degraded`)."""
    status = writer.status()
    detail = {"pending": status.pending, "spilled": status.spilled, "rejected": status.rejected,
              "failures_by_reason": status.failures_by_reason, "last_error": status.last_error}
    return Check("degraded" if status.degraded else "ok", 0.0, detail)

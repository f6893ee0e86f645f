"""Readiness checks for load balancers: each check reports its state and how long it took.

The database is required (`down` fails the server's health); Redis only speeds things up, so a Redis
failure is `degraded`: requests are still served, computed without the shared cache.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

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


async def redis_check(redis: Redis) -> Check:
    async def ping() -> None:
        await redis.ping()

    return await _probe(ping, "degraded", {})

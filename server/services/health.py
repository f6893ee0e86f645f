"""Readiness checks for load balancers: each check reports its state and how long it took."""

import asyncio
import time
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

CHECK_TIMEOUT_S = 2.0


@dataclass
class Check:
    status: str
    latency_ms: float
    detail: dict = field(default_factory=dict)


async def database_check(engine: AsyncEngine) -> Check:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        return Check("down", (time.perf_counter() - started) * 1000, {"error": f"{type(exc).__name__}: {exc}"})
    return Check("ok", (time.perf_counter() - started) * 1000, {"backend": engine.dialect.name})

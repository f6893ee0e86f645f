"""Readiness checks for load balancers: each check reports its state and how long it took.

The database is required (`down` fails the server's health); Redis only speeds things up, so a Redis
failure is `degraded`: requests are still served, computed without the shared cache. Records piling up
(the last write failed, or the backlog is not shrinking) are `degraded` too, never `down`: answers do not
wait for records, and the database check owns `down`.

`Health` holds the named checks of both probes: readiness (`/health`, what load balancers probe: `down` takes the
replica out of rotation) and liveness (`/health/live`, what orchestrators probe: `down` means restart the process).
A component adds its own with `health.ready[name] = async_check` (or `health.live[...]`). The checks of a probe run
concurrently, each bounded by `CHECK_TIMEOUT_S` from its start: a check that does not answer in time is reported
failed then, without waiting for its cancellation (a hung database's connect may take longer to give up).
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.services.infra.redis_client import GuardedRedis
from server.services.records import RecordWriter
from server.services.scheduling.interface import Batcher

CHECK_TIMEOUT_S = 2.0


@dataclass
class Check:
    status: str
    latency_ms: float
    detail: dict = field(default_factory=dict)


CheckFn = Callable[[], Awaitable[Check]]
Status = Literal["ok", "degraded", "down"]


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _abandon(task: asyncio.Task) -> None:
    """Cancel a check that ran out of time without waiting for it; its outcome is read so that nothing is logged."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _probe(run: Callable[[], Awaitable[None]], failed: str, detail: dict) -> Check:
    started = time.perf_counter()
    task = asyncio.ensure_future(run())
    try:
        await asyncio.wait_for(asyncio.shield(task), CHECK_TIMEOUT_S)
    except TimeoutError:
        _abandon(task)
        return Check(failed, _ms_since(started), {**detail, "error": f"no answer within {CHECK_TIMEOUT_S:g} s"})
    except Exception as exc:
        return Check(failed, _ms_since(started), {**detail, "error": f"{type(exc).__name__}: {exc}"})
    return Check("ok", _ms_since(started), detail)


@dataclass
class Report:
    status: Status
    checks: dict[str, Check]

    @property
    def http_status(self) -> int:
        return 503 if self.status == "down" else 200


class Health:
    def __init__(self) -> None:
        self.ready: dict[str, CheckFn] = {}
        self.live: dict[str, CheckFn] = {}
        self.draining = False
        self.ready["drain"] = self._drain_check

    async def _drain_check(self) -> Check:
        return Check("down" if self.draining else "ok", 0.0, {"draining": self.draining})

    async def readiness(self) -> Report:
        return await self._run(self.ready)

    async def liveness(self) -> Report:
        return await self._run(self.live)

    @staticmethod
    async def _run(checks: dict[str, CheckFn]) -> Report:
        async def bounded(check: CheckFn) -> Check:
            started = time.perf_counter()
            task = asyncio.ensure_future(check())
            try:
                return await asyncio.wait_for(asyncio.shield(task), CHECK_TIMEOUT_S)
            except TimeoutError:
                _abandon(task)
                return Check("down", _ms_since(started), {"error": f"no answer within {CHECK_TIMEOUT_S:g} s"})
            except Exception as exc:
                return Check("down", _ms_since(started), {"error": f"{type(exc).__name__}: {exc}"})

        results = dict(zip(checks, await asyncio.gather(*(bounded(check) for check in checks.values())), strict=True))
        states = {check.status for check in results.values()}
        return Report("down" if "down" in states else "degraded" if "degraded" in states else "ok", results)


def loop_readiness(loops: Mapping[str, Batcher[Any, Any]], info: dict[str, dict]) -> CheckFn:
    """`down` when a model's loop gave up (cannot be restarted) or is stalled; `degraded` while one restarts.
    `info`: what to show of each model beside its loop's state."""

    async def check() -> Check:
        detail = {
            name: {**info.get(name, {}), **loop.supervisor.status(), "stalled": loop.stalled, "queued": loop.queued}
            for name, loop in loops.items()
        }
        down = any(d["state"] == "failed" or d["stalled"] for d in detail.values())
        degraded = any(d["state"] != "running" for d in detail.values())
        return Check("down" if down else "degraded" if degraded else "ok", 0.0, detail)

    return check


def loop_liveness(loops: Mapping[str, Batcher[Any, Any]]) -> CheckFn:
    """`down` only when a model's loop cannot be restarted in this process."""

    async def check() -> Check:
        detail = {name: loop.supervisor.status() for name, loop in loops.items()}
        return Check("down" if any(d["state"] == "failed" for d in detail.values()) else "ok", 0.0, detail)

    return check


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
    detail = {
        "pending": status.pending,
        "spilled": status.spilled,
        "rejected": status.rejected,
        "failures_by_reason": status.failures_by_reason,
        "last_error": status.last_error,
        "task": status.task,
    }
    return Check("degraded" if status.degraded else "ok", 0.0, detail)


def server_health(
    loops: Mapping[str, Batcher[Any, Any]],
    info: dict[str, dict],
    engine: AsyncEngine,
    recorder: RecordWriter,
    redis: GuardedRedis | None,
) -> Health:
    """The server's probes: readiness needs the models' loops, the database and no drain; liveness the loops."""
    health = Health()

    async def records() -> Check:
        return records_check(recorder)

    health.ready |= {
        "models": loop_readiness(loops, info),
        "database": lambda: database_check(engine),
        "records": records,
    }
    if redis is not None:
        health.ready["redis"] = lambda: redis_check(redis)
    health.live["models"] = loop_liveness(loops)
    return health

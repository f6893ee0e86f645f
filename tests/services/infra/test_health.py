"""Readiness and liveness checks on their own (the HTTP probes are in tests/api/test_health.py): the worst check
decides, a check that fails or hangs is reported `down` in bounded time, the database is required, Redis only
degrades."""

import asyncio
from types import SimpleNamespace

import pytest

from server.db.session import create_engine
from server.services.infra import health as health_module
from server.services.infra.health import (
    Check,
    Health,
    database_check,
    loop_liveness,
    loop_readiness,
    redis_check,
)
from server.services.infra.redis_client import open_redis
from tests.support.servers import free_port


def answering(status: str, **detail) -> health_module.CheckFn:
    async def check() -> Check:
        return Check(status, 1.0, detail)

    return check


async def test_a_new_health_is_ready_and_live():
    health = Health()
    ready, live = await health.readiness(), await health.liveness()
    assert (ready.status, ready.http_status) == ("ok", 200)
    assert ready.checks["drain"].detail == {"draining": False}
    assert (live.status, live.http_status, live.checks) == ("ok", 200, {})


async def test_draining_takes_the_replica_out_of_rotation_but_keeps_it_alive():
    health = Health()
    health.draining = True
    ready = await health.readiness()
    assert (ready.status, ready.http_status) == ("down", 503)
    assert ready.checks["drain"].status == "down" and ready.checks["drain"].detail == {"draining": True}
    assert (await health.liveness()).status == "ok"


@pytest.mark.parametrize(
    ("states", "overall", "http_status"),
    [
        (["ok", "ok"], "ok", 200),
        (["ok", "degraded"], "degraded", 200),
        (["degraded", "down", "ok"], "down", 503),
    ],
)
async def test_the_worst_check_decides_and_only_down_is_a_503(states, overall, http_status):
    health = Health()
    for i, state in enumerate(states):
        health.ready[f"c{i}"] = answering(state, n=i)
    report = await health.readiness()
    assert (report.status, report.http_status) == (overall, http_status)
    assert {name: check.status for name, check in report.checks.items()} == {
        "drain": "ok",
        **{f"c{i}": state for i, state in enumerate(states)},
    }
    assert report.checks["c0"].detail == {"n": 0}


async def test_a_check_that_raises_is_down_with_its_error_and_the_others_are_still_reported():
    health = Health()

    async def broken() -> Check:
        raise RuntimeError("the probe itself failed")

    health.live |= {"broken": broken, "fine": answering("ok")}
    report = await health.liveness()
    assert report.status == "down" and report.http_status == 503
    assert report.checks["broken"].status == "down"
    assert report.checks["broken"].detail == {"error": "RuntimeError: the probe itself failed"}
    assert report.checks["fine"].status == "ok"


async def test_a_hung_check_is_reported_down_at_the_check_limit_while_the_others_answer(monkeypatch):
    monkeypatch.setattr(health_module, "CHECK_TIMEOUT_S", 0.1)
    health = Health()
    cancelled = asyncio.Event()

    async def hung() -> Check:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    health.ready |= {"hung": hung, "fine": answering("degraded")}
    report = await asyncio.wait_for(health.readiness(), 30)
    assert report.status == "down"
    assert report.checks["hung"].status == "down"
    assert report.checks["hung"].detail == {"error": "no answer within 0.1 s"}
    assert report.checks["fine"].status == "degraded"
    await asyncio.wait_for(cancelled.wait(), 30)


async def test_checks_run_concurrently():
    """Each check waits for the other: run one after the other, neither would ever answer."""
    health = Health()
    first, second = asyncio.Event(), asyncio.Event()

    def meeting(mine: asyncio.Event, theirs: asyncio.Event) -> health_module.CheckFn:
        async def check() -> Check:
            mine.set()
            await theirs.wait()
            return Check("ok", 0.0)

        return check

    health.live |= {"a": meeting(first, second), "b": meeting(second, first)}
    report = await asyncio.wait_for(health.liveness(), 30)
    assert report.status == "ok", report.checks


def loop(state: str = "running", *, stalled: bool = False, queued: int = 0) -> SimpleNamespace:
    """What the loop checks read of a scheduler: its supervisor's status, `stalled`, `queued`."""
    return SimpleNamespace(
        supervisor=SimpleNamespace(status=lambda: {"state": state, "failures": 0, "last_error": None}),
        stalled=stalled,
        queued=queued,
    )


@pytest.mark.parametrize(
    ("loops", "ready", "live"),
    [
        ({"g": loop(), "c": loop(queued=3)}, "ok", "ok"),
        ({"g": loop(), "c": loop("restarting")}, "degraded", "ok"),
        ({"g": loop(), "c": loop(stalled=True)}, "down", "ok"),
        ({"g": loop("failed"), "c": loop()}, "down", "down"),
    ],
    ids=["running", "restarting", "stalled", "failed"],
)
async def test_a_models_loop_failing_or_stalling_fails_readiness_and_only_a_failed_one_fails_liveness(
    loops, ready, live
):
    readiness = await loop_readiness(loops, {"g": {"model": "tiny"}})()
    liveness = await loop_liveness(loops)()
    assert (readiness.status, liveness.status) == (ready, live)
    assert readiness.detail["g"]["model"] == "tiny"
    assert set(readiness.detail["c"]) >= {"state", "stalled", "queued"}
    assert readiness.detail["c"]["queued"] == loops["c"].queued


async def test_the_database_check_is_ok_when_the_database_answers(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'health.db'}", timeout_s=5)
    try:
        check = await database_check(engine)
    finally:
        await engine.dispose()
    assert check.status == "ok" and check.detail == {"backend": "sqlite"}


async def test_a_database_that_cannot_be_reached_is_down_with_the_error():
    engine = create_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none", timeout_s=1)
    try:
        check = await database_check(engine)
    finally:
        await engine.dispose()
    assert check.status == "down"
    assert check.detail["backend"] == "postgresql" and check.detail["error"]


async def test_the_postgresql_check_answers_ok(postgres):
    engine = create_engine(postgres.url(), timeout_s=5)
    try:
        check = await database_check(engine)
    finally:
        await engine.dispose()
    assert check.status == "ok" and check.detail == {"backend": "postgresql"}


async def test_redis_answering_is_ok_and_a_dead_redis_is_degraded_not_down(redis_server):
    client = open_redis(redis_server.url, timeout_s=1)
    try:
        check = await redis_check(client)
        assert check.status == "ok" and check.detail == {"circuit": "closed"}
        redis_server.stop()
        failed = await redis_check(client)
        assert failed.status == "degraded" and failed.detail["error"]
        assert failed.detail["circuit"] == "open"
        skipped = await redis_check(client)
        assert skipped.status == "degraded" and "skipped" in skipped.detail["error"]
        assert skipped.detail["circuit"] == "open"
    finally:
        await client.aclose()


async def test_the_redis_check_is_the_probe_that_closes_the_circuit_once_redis_is_back(redis_server):
    client = open_redis(redis_server.url, timeout_s=1)
    client.circuit.base_interval_s = 0.05
    try:
        redis_server.stop()
        assert (await redis_check(client)).detail["circuit"] == "open"
        redis_server.start()
        for _ in range(200):
            check = await redis_check(client)
            if check.status == "ok":
                break
            await asyncio.sleep(0.02)
        assert check.status == "ok" and check.detail == {"circuit": "closed"}
    finally:
        await client.aclose()

import asyncio

import pytest

from server.services.infra.circuit import CircuitBreaker, CircuitOpen
from tests.support.clock import Clock
from tests.support.metrics import metric


class Down(ConnectionError):
    """The dependency did not answer."""


class Refused(ValueError):
    """The dependency answered with an error."""


@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("dep", failures=(Down,), base_interval_s=0.5, max_interval_s=4.0, clock=clock)


async def call(breaker: CircuitBreaker, error: BaseException | None = None) -> bool:
    """True when the body ran; re-raises `error` from inside the guarded body."""
    async with breaker.guard():
        if error is not None:
            raise error
    return True


async def fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(Down):
        await call(breaker, Down("no answer"))


async def fail_probe(breaker: CircuitBreaker, clock: Clock) -> None:
    clock.now += breaker.interval_s
    await fail(breaker)


async def test_a_failure_opens_the_circuit_and_calls_are_skipped_without_running(breaker, clock):
    assert await call(breaker) and breaker.state == "closed"
    await fail(breaker)
    assert breaker.state == "open" and metric("circuit_state", dependency="dep") == 1
    skipped = metric("circuit_skipped_total", dependency="dep")
    ran = []
    with pytest.raises(CircuitOpen) as skipped_call:
        async with breaker.guard():
            ran.append(True)
    assert ran == [] and skipped_call.value.retry_in_s == pytest.approx(0.5)
    assert "Down: no answer" in str(skipped_call.value)
    clock.now += 0.499
    with pytest.raises(CircuitOpen):
        await call(breaker)
    assert metric("circuit_skipped_total", dependency="dep") == skipped + 2


async def test_the_interval_doubles_on_each_failed_probe_up_to_the_maximum(breaker, clock):
    await fail(breaker)
    intervals = []
    for _ in range(6):
        intervals.append(breaker.interval_s)
        clock.now += breaker.interval_s - 0.001
        with pytest.raises(CircuitOpen):
            await call(breaker)
        clock.now += 0.001
        await fail(breaker)
    assert intervals == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


async def test_one_caller_probes_while_the_others_are_skipped_and_success_closes(breaker, clock):
    await fail(breaker)
    await fail_probe(breaker, clock)
    assert breaker.interval_s == 1.0
    clock.now += breaker.interval_s
    release = asyncio.Event()

    async def slow_probe() -> None:
        async with breaker.guard():
            await release.wait()

    probe = asyncio.create_task(slow_probe())
    await asyncio.sleep(0)
    assert breaker.state == "half_open" and metric("circuit_state", dependency="dep") == 2
    with pytest.raises(CircuitOpen, match="probe"):
        await call(breaker)
    release.set()
    await probe
    assert breaker.state == "closed" and metric("circuit_state", dependency="dep") == 0
    assert await call(breaker)
    await fail(breaker)
    assert breaker.interval_s == 0.5, "closing resets the interval"


async def test_an_error_answer_is_a_success(breaker, clock):
    with pytest.raises(Refused):
        await call(breaker, Refused("wrong type"))
    assert breaker.state == "closed"
    await fail(breaker)
    clock.now += breaker.interval_s
    with pytest.raises(Refused):
        await call(breaker, Refused("wrong type"))
    assert breaker.state == "closed"


async def test_a_cancelled_probe_lets_the_next_call_probe(breaker, clock):
    await fail(breaker)
    clock.now += breaker.interval_s
    started = asyncio.Event()

    async def hanging_probe() -> None:
        async with breaker.guard():
            started.set()
            await asyncio.sleep(60)

    probe = asyncio.create_task(hanging_probe())
    await started.wait()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state == "open" and breaker.interval_s == 0.5
    assert await call(breaker) and breaker.state == "closed"


async def test_calls_in_flight_when_it_opens_do_not_lengthen_the_interval(breaker, clock):
    gate = asyncio.Event()
    failures = metric("circuit_failures_total", dependency="dep")

    async def in_flight() -> None:
        async with breaker.guard():
            await gate.wait()
            raise Down("timed out")

    calls = [asyncio.create_task(in_flight()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, Down) for result in results)
    assert metric("circuit_failures_total", dependency="dep") == failures + 5
    assert breaker.state == "open" and breaker.interval_s == 0.5
    clock.now += 0.5
    assert await call(breaker), "one outage, one interval: the probe is due after 0.5 s"


async def test_a_probe_outdated_by_another_answer_does_not_release_the_current_probe(breaker, clock):
    gates = {name: asyncio.Event() for name in ("early", "old_probe", "probe")}

    async def held(name: str, error: BaseException | None = None) -> None:
        async with breaker.guard():
            await gates[name].wait()
            if error is not None:
                raise error

    early = asyncio.create_task(held("early"))
    await asyncio.sleep(0)
    await fail(breaker)
    clock.now += breaker.interval_s
    old_probe = asyncio.create_task(held("old_probe", Down("late")))
    await asyncio.sleep(0)
    gates["early"].set()
    await early
    assert breaker.state == "closed", "an answer closes the circuit, whoever gets it"
    await fail(breaker)
    clock.now += breaker.interval_s
    probe = asyncio.create_task(held("probe"))
    await asyncio.sleep(0)
    gates["old_probe"].set()
    with pytest.raises(Down):
        await old_probe
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen, match="probe"):
        await call(breaker)
    gates["probe"].set()
    await probe
    assert breaker.state == "closed"


async def test_on_close_callbacks_run_when_the_circuit_closes_again(breaker, clock):
    closed: list[str] = []
    breaker.on_close(lambda: closed.append(breaker.state))
    assert await call(breaker) and closed == [], "closed all along: nothing deferred to run"
    await fail(breaker)
    clock.now += breaker.interval_s
    assert await call(breaker) and closed == ["closed"]

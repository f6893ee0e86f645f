"""Gate names are unique per test: the rejected-items counter lives in the process-wide Prometheus registry."""

import asyncio
import uuid
from dataclasses import dataclass

import pytest

from server.services.errors import DeadlineExceeded, InputError, ModelFailed, Overloaded
from server.services.scheduling.admission import LINGER_FRACTION, AdmissionGate, History, answers
from tests.support.metrics import metric


class Queue:
    """A model's queue behind a gate: what `submit` takes is then waiting, as in the schedulers."""

    def __init__(self, limit: int, waiting: int = 0, retry_after_s: float = 7.0):
        self.waiting = waiting
        self.name = f"model-{uuid.uuid4().hex[:8]}"
        self.gate = AdmissionGate(self.name, limit, lambda: self.waiting, lambda: retry_after_s)

    def submit(self, count: int) -> None:
        self.gate.take(count)
        self.waiting += count

    def rejected(self) -> float:
        return metric("scheduler_rejected_items_total", model=self.name)


def test_a_request_larger_than_the_whole_queue_is_an_input_error_not_overloaded():
    queue = Queue(limit=4, waiting=4)
    with pytest.raises(InputError) as caught, queue.gate.admission(5):
        pytest.fail("admitted")
    [error] = caught.value.errors
    assert error.loc == ("body",)
    assert "5 items" in error.msg and "SCHEDULER_QUEUE_LIMIT=4" in error.msg
    with pytest.raises(InputError):
        queue.submit(5)
    assert queue.rejected() == 0
    assert queue.gate.reserved == 0


def test_a_request_the_size_of_the_queue_is_admitted_into_an_empty_one():
    queue = Queue(limit=4)
    with queue.gate.admission(4):
        queue.submit(4)
    assert queue.waiting == 4


async def test_an_admission_holds_room_so_a_request_that_does_not_fit_meanwhile_is_overloaded():
    queue = Queue(limit=10, waiting=1, retry_after_s=7.0)
    held, release = asyncio.Event(), asyncio.Event()

    async def first_request():
        with queue.gate.admission(6):
            held.set()
            await release.wait()

    first = asyncio.create_task(first_request())
    await held.wait()
    with pytest.raises(Overloaded) as caught, queue.gate.admission(4):
        pytest.fail("admitted past the reservation")
    assert caught.value.retry_after_s == 7.0
    assert queue.rejected() == 4
    # The refusal reserved nothing: what is left still fits exactly.
    with queue.gate.admission(3):
        pass
    release.set()
    await first
    with queue.gate.admission(9):
        pass
    assert queue.gate.reserved == 0


def test_takes_inside_an_admission_draw_on_its_reservation():
    queue = Queue(limit=6)
    with queue.gate.admission(6):
        # Fresh room alone would refuse these: the reservation itself fills the queue.
        queue.submit(4)
        assert queue.gate.reserved == 2
        queue.submit(2)
        assert queue.gate.reserved == 0
        with pytest.raises(Overloaded):
            queue.submit(1)
    assert queue.waiting == 6 and queue.gate.reserved == 0


def test_a_take_outside_an_admission_checks_fresh_room():
    queue = Queue(limit=5, waiting=3)
    queue.submit(2)
    assert queue.gate.reserved == 0
    with pytest.raises(Overloaded):
        queue.submit(1)
    with pytest.raises(InputError):
        queue.submit(6)
    assert queue.waiting == 5 and queue.rejected() == 1


async def test_a_task_started_inside_an_admission_draws_on_it_and_an_older_one_does_not():
    queue = Queue(limit=4)
    go = asyncio.Event()

    async def submit_when_told(count: int) -> None:
        await go.wait()
        queue.submit(count)

    older = asyncio.create_task(submit_when_told(1))
    with queue.gate.admission(4):
        go.set()
        with pytest.raises(Overloaded):
            await older
        await asyncio.create_task(submit_when_told(4))
    assert queue.waiting == 4 and queue.gate.reserved == 0


def test_a_reservation_on_one_gate_does_not_pay_for_another():
    first, second = Queue(limit=4), Queue(limit=4, waiting=2)
    with first.gate.admission(4):
        second.submit(2)
        with pytest.raises(Overloaded):
            second.submit(1)
        assert first.gate.reserved == 4


def test_the_reservation_is_released_on_exit_including_what_was_not_taken():
    queue = Queue(limit=6)
    with queue.gate.admission(5):
        queue.submit(2)
    assert queue.gate.reserved == 0
    # The spent admission grants nothing more: fresh room for 4, not 5.
    queue.submit(4)
    with pytest.raises(Overloaded):
        queue.submit(1)
    assert queue.gate.reserved == 0


def test_the_reservation_is_released_when_the_request_fails():
    queue = Queue(limit=6)
    with pytest.raises(RuntimeError), queue.gate.admission(5):
        queue.submit(1)
        raise RuntimeError("the request failed")
    assert queue.gate.reserved == 0
    with queue.gate.admission(5):
        pass


def history_after_a_batch(*, callers: int, arrived_since: int, duration_s: float = 0.0, ended_s_ago: float = 0.0):
    return History(
        done_at=asyncio.get_running_loop().time() - ended_s_ago,
        duration_s=duration_s,
        callers=callers,
        arrived_since=arrived_since,
    )


async def test_linger_returns_at_once_when_as_many_arrived_as_the_last_batch_answered():
    history = history_after_a_batch(callers=3, arrived_since=3)
    await asyncio.wait_for(history.linger(asyncio.Event(), lambda: 3, 8, max_wait_s=5.0), 1.0)


async def test_linger_returns_at_once_when_the_batch_is_full():
    history = history_after_a_batch(callers=3, arrived_since=0)
    await asyncio.wait_for(history.linger(asyncio.Event(), lambda: 8, 8, max_wait_s=5.0), 1.0)


async def test_linger_gives_up_after_max_wait_when_fewer_arrived():
    loop = asyncio.get_running_loop()
    history = history_after_a_batch(callers=3, arrived_since=1)
    await asyncio.wait_for(history.linger(asyncio.Event(), lambda: 1, 8, max_wait_s=0.05), 1.0)
    # The loop's timers may fire up to its clock resolution early.
    assert loop.time() - history.done_at >= 0.05 - 0.01


async def test_after_a_long_batch_linger_waits_a_fraction_of_its_duration():
    loop = asyncio.get_running_loop()
    history = history_after_a_batch(callers=3, arrived_since=0, duration_s=1.5)
    await asyncio.wait_for(history.linger(asyncio.Event(), lambda: 0, 8, max_wait_s=0.01), 1.0)
    assert loop.time() - history.done_at >= LINGER_FRACTION * 1.5 - 0.01


async def test_the_linger_bound_counts_from_the_end_of_the_last_batch():
    history = history_after_a_batch(callers=3, arrived_since=0, ended_s_ago=1.0)
    await asyncio.wait_for(history.linger(asyncio.Event(), lambda: 0, 8, max_wait_s=0.5), 0.3)


async def test_arrivals_wake_the_linger_which_ends_once_enough_arrived():
    history = history_after_a_batch(callers=2, arrived_since=0)
    wakeup = asyncio.Event()
    lingering = asyncio.create_task(history.linger(wakeup, lambda: history.arrived_since, 8, max_wait_s=5.0))
    await asyncio.sleep(0.01)
    history.arrived_since = 1
    wakeup.set()
    await asyncio.sleep(0.01)
    assert not lingering.done()
    history.arrived_since = 2
    wakeup.set()
    await asyncio.wait_for(lingering, 1.0)


async def test_a_wakeup_left_from_before_the_linger_does_not_end_it():
    history = history_after_a_batch(callers=2, arrived_since=0)
    wakeup = asyncio.Event()
    wakeup.set()
    lingering = asyncio.create_task(history.linger(wakeup, lambda: 0, 8, max_wait_s=0.15))
    await asyncio.sleep(0.02)
    assert not lingering.done()
    await asyncio.wait_for(lingering, 1.0)


@dataclass
class Caller:
    future: asyncio.Future
    abandoned_because: str | None = None


def new_callers(count: int) -> list[Caller]:
    loop = asyncio.get_running_loop()
    return [Caller(loop.create_future()) for _ in range(count)]


async def test_answers_are_the_results_in_the_callers_order():
    callers = new_callers(3)
    loop = asyncio.get_running_loop()
    # Answered last to first.
    for delay, (index, caller) in enumerate(reversed(list(enumerate(callers)))):
        loop.call_later(0.001 * delay, caller.future.set_result, f"result {index}")
    assert await answers("model", callers, timeout_s=1.0) == ["result 0", "result 1", "result 2"]
    assert all(c.abandoned_because is None and not c.future.cancelled() for c in callers)


async def test_past_the_deadline_callers_are_abandoned_and_their_futures_cancelled():
    callers = new_callers(3)
    callers[1].future.set_result("answered")
    with pytest.raises(DeadlineExceeded, match="the generator model did not answer within 0.05 s"):
        await answers("generator", callers, timeout_s=0.05)
    assert [c.abandoned_because for c in callers] == ["deadline"] * 3
    assert callers[0].future.cancelled() and callers[2].future.cancelled()
    assert callers[1].future.result() == "answered"


async def test_a_failed_item_fails_the_answer_and_cancels_the_rest_without_a_deadline():
    callers = new_callers(2)
    callers[0].future.set_exception(ModelFailed("bad input"))
    with pytest.raises(ModelFailed, match="bad input"):
        await answers("model", callers, timeout_s=1.0)
    assert callers[1].future.cancelled()
    assert [c.abandoned_because for c in callers] == [None, None]


async def test_a_caller_that_leaves_cancels_its_futures_without_a_deadline():
    callers = new_callers(2)
    waiting = asyncio.create_task(answers("model", callers, timeout_s=5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert all(c.future.cancelled() for c in callers)
    assert [c.abandoned_because for c in callers] == [None, None]

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.core.supervisor import RestartPolicy
from server.services.errors import DeadlineExceeded, ModelFailed, Overloaded
from server.services.scheduling.static import ABORTED, MicroBatcher
from tests.support.metrics import metric
from tests.support.waiting import until


class Model:
    """Doubles numbers; records each call; can be held mid-call with `gate`; raises on 'poison' items."""

    def __init__(self):
        self.calls: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: list, abandoned) -> list:
        self.calls.append(list(items))
        self.entered.set()
        self.gate.wait(10)
        if "poison" in items:
            raise ValueError("poisoned")
        return [item * 2 for item in items]


@pytest.fixture
def model() -> Model:
    return Model()


@pytest.fixture
async def make_batcher(model: Model):
    executor = ThreadPoolExecutor(1)
    made = []

    def make(**overrides) -> MicroBatcher:
        options = {"max_batch_size": 4, "max_wait_s": 0.005, "queue_limit": 100} | overrides
        batcher = MicroBatcher("test", model, executor, **options)
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    model.gate.set()
    for batcher in made:
        await batcher.close()
    executor.shutdown()


async def hold(model: Model, batcher: MicroBatcher, item=0) -> asyncio.Task:
    """Occupy the model with one call that waits for `model.gate`."""
    model.gate.clear()
    model.entered.clear()
    task = asyncio.create_task(batcher.submit([item], timeout_s=10))
    await asyncio.to_thread(model.entered.wait, 5)
    return task


async def test_lone_item_is_dispatched_alone_and_at_once(model, make_batcher):
    batcher = make_batcher(max_wait_s=5.0)
    assert await asyncio.wait_for(batcher.submit([3], timeout_s=10), 1.0) == [6]
    assert model.calls == [[3]]


async def test_items_arriving_during_a_batch_form_the_next_one(model, make_batcher):
    batcher = make_batcher()
    first = await hold(model, batcher)
    waiting = [asyncio.create_task(batcher.submit([i], timeout_s=10)) for i in range(1, 4)]
    await asyncio.sleep(0.05)
    model.gate.set()
    assert [await t for t in waiting] == [[2], [4], [6]]
    assert await first == [0]
    assert model.calls == [[0], [1, 2, 3]]


async def test_batches_never_exceed_max_size_and_keep_arrival_order(model, make_batcher):
    batcher = make_batcher(max_batch_size=3)
    first = await hold(model, batcher)
    waiting = asyncio.create_task(batcher.submit(list(range(1, 8)), timeout_s=10))
    await asyncio.sleep(0.05)
    model.gate.set()
    assert await waiting == [2 * i for i in range(1, 8)]
    await first
    assert model.calls[1:] == [[1, 2, 3], [4, 5, 6], [7]]


async def test_groups_never_share_a_batch(model, make_batcher):
    batcher = make_batcher(max_batch_size=10, group_of=lambda item: item % 2)
    first = await hold(model, batcher, item=100)
    waiting = [asyncio.create_task(batcher.submit([i], timeout_s=10)) for i in range(1, 7)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(first, *waiting)
    assert model.calls[1:] == [[1, 3, 5], [2, 4, 6]]


async def test_equal_items_in_one_batch_are_computed_once(model, make_batcher):
    batcher = make_batcher(dedup_key_of=lambda item: item)
    first = await hold(model, batcher)
    waiting = [asyncio.create_task(batcher.submit([5], timeout_s=10)) for _ in range(3)]
    waiting.append(asyncio.create_task(batcher.submit([6], timeout_s=10)))
    await asyncio.sleep(0.05)
    model.gate.set()
    assert [await t for t in waiting] == [[10], [10], [10], [12]]
    await first
    assert model.calls[1:] == [[5, 6]]


async def test_items_equal_to_a_waiting_one_take_no_queue_room(model, make_batcher):
    batcher = make_batcher(dedup_key_of=lambda item: item, queue_limit=2)
    first = await hold(model, batcher)
    waiting = [asyncio.create_task(batcher.submit([5], timeout_s=10)) for _ in range(3)]
    await asyncio.sleep(0.01)
    other = asyncio.create_task(batcher.submit([6], timeout_s=10))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await batcher.submit([7], timeout_s=10)
    model.gate.set()
    assert [await t for t in (*waiting, other)] == [[10], [10], [10], [12]]
    await first


async def test_an_interactive_item_promotes_an_equal_waiting_background_item(model, make_batcher):
    """Computed once, in the interactive batch, for both callers."""
    batcher = make_batcher(dedup_key_of=lambda item: item)
    first = await hold(model, batcher)
    background = asyncio.create_task(batcher.submit([5], timeout_s=10, background=True))
    unrelated = asyncio.create_task(batcher.submit([9], timeout_s=10, background=True))
    await asyncio.sleep(0.01)
    interactive = asyncio.create_task(batcher.submit([5], timeout_s=10))
    await asyncio.sleep(0.01)
    model.gate.set()
    assert await interactive == [10] and await background == [10] and await unrelated == [18]
    await first
    assert model.calls[1:] == [[5], [9]]


async def test_full_queue_refuses_with_retry_after_and_enqueues_nothing(model, make_batcher):
    batcher = make_batcher(queue_limit=3)
    first = await hold(model, batcher)
    queued = asyncio.create_task(batcher.submit([1, 2], timeout_s=10))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit([3, 4], timeout_s=10)
    assert refused.value.retry_after_s >= 1
    assert batcher.queued == 2
    model.gate.set()
    assert await queued == [2, 4]
    await first


async def test_cancelled_and_timed_out_items_are_dropped_before_computing(model, make_batcher):
    batcher = make_batcher()
    first = await hold(model, batcher)
    gone = asyncio.create_task(batcher.submit([1], timeout_s=10))
    late = asyncio.create_task(batcher.submit([2], timeout_s=0.05))
    kept = asyncio.create_task(batcher.submit([3], timeout_s=10))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(DeadlineExceeded):
        await late
    model.gate.set()
    assert await kept == [6]
    await first
    assert model.calls[1:] == [[3]]


async def test_one_failing_item_does_not_fail_its_batch_mates(model, make_batcher):
    batcher = make_batcher()
    first = await hold(model, batcher)
    good = [asyncio.create_task(batcher.submit([i], timeout_s=10)) for i in (1, 2)]
    bad = asyncio.create_task(batcher.submit(["poison"], timeout_s=10))
    await asyncio.sleep(0.05)
    model.gate.set()
    assert [await t for t in good] == [[2], [4]]
    with pytest.raises(ModelFailed, match="poisoned"):
        await bad
    await first
    assert model.calls[1:] == [[1, 2, "poison"], [1], [2, "poison"], [2], ["poison"]]


async def test_callers_of_a_finished_batch_rejoin_the_waiting_items(model, make_batcher):
    """Closed-loop clients: the answered caller's next item is merged with those already waiting. The linger ends
    when it arrives; its bound (max_wait_s) is only how late it may be, which a loaded machine stretches."""
    batcher = make_batcher(max_wait_s=2.0)
    first = await hold(model, batcher)
    waiting = [asyncio.create_task(batcher.submit([i], timeout_s=10)) for i in (1, 2)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await first
    again = await batcher.submit([9], timeout_s=10)
    assert again == [18]
    await asyncio.gather(*waiting)
    assert model.calls == [[0], [1, 2, 9]]


async def test_linger_waits_for_a_returner_slower_than_max_wait(model, make_batcher):
    """The linger is capped by 10% of the last batch (1 s here), not by the 1 ms max_wait."""
    batcher = make_batcher(max_wait_s=0.001)
    first = await hold(model, batcher)
    waiting = asyncio.create_task(batcher.submit([1], timeout_s=10))
    await asyncio.sleep(1.0)
    model.gate.set()
    await first
    await asyncio.sleep(0.01)
    again = asyncio.create_task(batcher.submit([9], timeout_s=10))
    await asyncio.gather(waiting, again)
    assert model.calls == [[0], [1, 9]]


async def test_a_request_is_admitted_whole_or_not_at_all(model, make_batcher):
    batcher = make_batcher(queue_limit=4)
    first = await hold(model, batcher)

    async def other_request(items: list) -> list:
        return await asyncio.create_task(batcher.submit(items, timeout_s=10), context=contextvars.Context())

    with batcher.admission(3):
        with pytest.raises(Overloaded):
            await other_request([7, 8])
        with pytest.raises(Overloaded):
            with batcher.admission(2):
                pass
        inside = [asyncio.create_task(batcher.submit([i], timeout_s=10)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert batcher.queued == 3
        with pytest.raises(Overloaded):
            await other_request([4, 5])
        last = asyncio.create_task(other_request([4]))
        model.gate.set()
        assert [await task for task in inside] == [[2], [4], [6]]
    assert await last == [8]
    await first
    with batcher.admission(4):
        pass
    assert sorted(sum(model.calls, [])) == [0, 1, 2, 3, 4]


class Stepper:
    """A model that works in steps until its item is abandoned (or 5 s pass), and says what it saw."""

    def __init__(self):
        self.started = threading.Event()
        self.saw_abandoned: list[bool] = []

    def __call__(self, items: list, abandoned) -> list:
        self.started.set()
        for _ in range(5000):
            if all(abandoned(i) for i in range(len(items))):
                break
            threading.Event().wait(0.001)
        self.saw_abandoned = [abandoned(i) for i in range(len(items))]
        return [ABORTED if gone else item for item, gone in zip(items, self.saw_abandoned, strict=True)]


@pytest.mark.parametrize("reason", ["cancelled", "deadline"])
async def test_an_item_whose_callers_are_gone_is_aborted_mid_computation(reason):
    stepper = Stepper()
    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(
        "stepper", stepper, executor, max_batch_size=4, max_wait_s=0.001, queue_limit=10, dedup_key_of=lambda item: item
    )
    batcher.start()
    before = metric("scheduler_aborted_items_total", model="stepper", reason=reason)
    try:
        callers = [
            asyncio.create_task(batcher.submit([1], timeout_s=0.2 if reason == "deadline" else 10)) for _ in range(2)
        ]
        await asyncio.to_thread(stepper.started.wait, 5)
        if reason == "cancelled":
            callers[0].cancel()
            await asyncio.sleep(0.05)
            assert stepper.saw_abandoned == []
            callers[1].cancel()
        results = await asyncio.gather(*callers, return_exceptions=True)
        expected = asyncio.CancelledError if reason == "cancelled" else DeadlineExceeded
        assert all(isinstance(result, expected) for result in results)
        await until(lambda: stepper.saw_abandoned, 5)
        assert stepper.saw_abandoned == [True]
        await until(lambda: metric("scheduler_aborted_items_total", model="stepper", reason=reason) > before, 5)
        assert metric("scheduler_aborted_items_total", model="stepper", reason=reason) == before + 1
    finally:
        await batcher.close()
        executor.shutdown()


async def test_background_items_run_only_when_no_interactive_item_waits(model, make_batcher):
    batcher = make_batcher(max_batch_size=4, background_max_size=2)
    behind_before = metric("scheduler_background_batches_waited_count", model="test")
    waited_before = metric("scheduler_background_batches_waited_sum", model="test")
    first = await hold(model, batcher, item=100)
    background = [asyncio.create_task(batcher.submit([i], timeout_s=10, background=True)) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    interactive = [asyncio.create_task(batcher.submit([i], timeout_s=10)) for i in (10, 11)]
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.gather(first, *background, *interactive)
    assert model.calls == [[100], [10, 11], [1, 2], [3, 4], [5]]

    model.gate.clear()
    model.entered.clear()
    running = [asyncio.create_task(batcher.submit([i], timeout_s=10, background=True)) for i in (20, 21, 22)]
    await asyncio.to_thread(model.entered.wait, 5)
    late = asyncio.create_task(batcher.submit([30], timeout_s=10))
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.gather(*running, late)
    assert model.calls[-3:] == [[20, 21], [30], [22]]
    observed = metric("scheduler_background_batches_waited_count", model="test") - behind_before
    within_one = metric("scheduler_background_batches_waited_bucket", model="test", le="1.0")
    assert observed == 4 and within_one == metric("scheduler_background_batches_waited_count", model="test")
    assert metric("scheduler_background_batches_waited_sum", model="test") - waited_before == 1


async def test_a_failed_batch_is_bisected_not_retried_item_by_item(model, make_batcher):
    batcher = make_batcher(max_batch_size=16)
    first = await hold(model, batcher)
    items = [*range(1, 6), "poison", *range(6, 16)]
    tasks = [asyncio.create_task(batcher.submit([item], timeout_s=10)) for item in items]
    await asyncio.sleep(0.05)
    model.gate.set()
    await first
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(outcomes[5], ModelFailed)
    assert [out for i, out in enumerate(outcomes) if i != 5] == [[2 * i] for i in items if i != "poison"]
    assert len(model.calls[2:]) <= 2 * 4, "two calls per halving of 16 items"


async def test_an_error_that_escapes_the_loop_fails_its_batch_and_the_loop_restarts(model, make_batcher, monkeypatch):
    batcher = make_batcher(restart=RestartPolicy(backoff_s=0.01, window_s=60, give_up_after=2))
    before = metric("background_task_failures_total", task="batcher-test")
    monkeypatch.setattr(batcher, "_bisect", lambda items, abandoned: 1 / 0)
    with pytest.raises(ModelFailed, match="ZeroDivisionError"):
        await batcher.submit(["poison"], timeout_s=10)
    assert metric("background_task_failures_total", task="batcher-test") - before == 1
    assert await batcher.submit([3], timeout_s=10) == [6]
    with pytest.raises(ModelFailed, match="ZeroDivisionError"):
        await batcher.submit(["poison"], timeout_s=10)
    await until(lambda: batcher.supervisor.state == "failed", 5)
    with pytest.raises(ModelFailed, match="restart"):
        await batcher.submit([3], timeout_s=10)


async def test_items_waiting_on_a_held_model_beyond_the_stall_limit_are_a_stall(model, make_batcher):
    batcher = make_batcher(stall_s=0.2)
    first = await hold(model, batcher)
    assert not batcher.stalled
    async with asyncio.timeout(5):
        while not batcher.stalled:
            await asyncio.sleep(0.01)
    model.gate.set()
    await first
    assert not batcher.stalled

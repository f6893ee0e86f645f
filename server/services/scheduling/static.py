"""Dynamic micro-batching: one `MicroBatcher` per model gathers concurrent items into model calls (the static
`Batcher` of interface.py).

Semantics (what other servers do is in docs/design-decisions.md):

- One batch in flight per model. Its blocking call runs in the `ThreadPoolExecutor` (torch releases the
  GIL), so the event loop keeps accepting requests; items that arrive meanwhile form the next batch.
- An idle model dispatches at once: a lone request waits for nothing.
- After a batch completes, its callers usually send their next request within milliseconds. The
  batcher lingers for them, so that they join the waiting items instead of forming a small batch of
  their own (without this, closed-loop clients settle into alternating small and large batches). The
  linger ends as soon as the batch is full or as many items arrived as the last batch answered, and
  at the latest `max(max_wait_s, LINGER_FRACTION * last batch's duration)` after that batch ended: waiting
  never costs more than a small fraction of a model call. Arrival gaps are no signal here: the event
  loop answers a whole batch before it reads the next requests, so returners arrive in bursts.
- A batch holds items of one group only (`group_of`: generation parameters, say), oldest item first.
- Two priority classes: interactive items (the default) always go first; `background` items (the batch
  offload's `local` provider) are dispatched only when no interactive item waits, and in batches of at
  most `background_max_size`, so an interactive arrival waits behind at most one small background batch
  (observed per interactive item in `scheduler_background_batches_waited{model}`).
- Items with equal `dedup_key_of` (not None) in one batch are computed once; each caller gets the result. An
  interactive batch takes the waiting background items equal to its own along (they are promoted, not computed
  twice).
- Bounded queue: past `queue_limit` waiting computations, `submit` raises `Overloaded` and enqueues nothing. An
  item equal to one already waiting joins its computation and takes no room.
  A request of more items than `queue_limit` could never be admitted and raises `InputError` (422) instead.
- A request is admitted whole: `admission(n)` reserves room for its n items before any of them is submitted
  (or raises `Overloaded`), and submits made inside it (in the same task or tasks it starts) draw on that
  reservation, so a request that gets 503 has had none of its items computed.
- Cancelled items (client gone, deadline passed) still waiting are dropped, never computed.
- Abandoned items stop mid-computation: `compute(items, abandoned)` may call `abandoned(i)` between its steps
  (a decoding step, say); it turns true once every caller of item i is gone, and `compute` may then return
  `ABORTED` for that item instead of finishing it (counted in `scheduler_aborted_items_total{model,reason}`).
- A batch that raises is bisected (each half retried, a failing half split again, about 2 log2(n) calls for one
  guilty item among n), so only the guilty item's caller gets `ModelFailed`.
- Supervision (server/core/supervisor.py): an error that escapes the loop fails the batch it was running with a
  `ModelFailed` naming it, and the loop restarts; `restart.give_up_after` failures within `restart.window_s` and it
  stays down (state `failed`, what was queued fails too). `stalled`: items wait or run and the model made no
  progress (a call started or ended, or `compute` looked at `abandoned` between its steps) for `stall_s`.
"""

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Final, Generic, TypeVar

from server.core import metrics
from server.core.supervisor import RestartPolicy, Supervisor
from server.services.errors import ModelFailed, Overloaded
from server.services.scheduling.admission import AdmissionGate, History, answers
from server.services.scheduling.interface import AbandonReason, BatchSizes, TokenSink

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class Aborted:
    def __repr__(self) -> str:
        return "ABORTED"


ABORTED: Final = Aborted()
"""What `compute` returns for an item it stopped because every caller of the item was gone."""

Abandoned = Callable[[int], bool]


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    future: "asyncio.Future[R]"
    enqueued_at: float
    background: bool
    background_batches_before: int
    abandoned_because: AbandonReason = "cancelled"


class _Liveness:
    """Which items of a running batch still have a caller. Futures' done-callbacks update it on the event loop;
    `compute` reads it from the executor thread (a list of bools: a read never sees a torn value)."""

    def __init__(self, batch: "list[list[_Entry]]", on_step: Callable[[], None]):
        self.batch = batch
        self.on_step = on_step
        self.waiting = [sum(not entry.future.done() for entry in entries) for entries in batch]
        self.gone = [count == 0 for count in self.waiting]
        for index, entries in enumerate(batch):
            for entry in entries:
                if not entry.future.done():
                    entry.future.add_done_callback(partial(self._left, index))

    def _left(self, index: int, future: asyncio.Future) -> None:
        self.waiting[index] -= 1
        if self.waiting[index] == 0:
            self.gone[index] = True

    def __call__(self, index: int) -> bool:
        self.on_step()
        return self.gone[index]

    def reason(self, index: int) -> AbandonReason:
        return self.batch[index][0].abandoned_because


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        compute: Callable[[list[T], Abandoned], Sequence[R | Aborted]],
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_limit: int,
        background_max_size: int | None = None,
        group_of: Callable[[T], Hashable] = lambda item: None,
        dedup_key_of: Callable[[T], Hashable | None] = lambda item: None,
        restart: RestartPolicy = RestartPolicy(),
        stall_s: float = 30.0,
    ):
        self.name = name
        self.compute = compute
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.background_max_size = background_max_size or max_batch_size
        self.max_wait_s = max_wait_s
        self.gate = AdmissionGate(name, queue_limit, lambda: self._computations(self._queue), self._retry_after_s)
        self.group_of = group_of
        self.dedup_key_of = dedup_key_of
        self._queue: deque[_Entry[T, R]] = deque()
        self._background_batches = 0
        self._running_background = False
        self._wakeup = asyncio.Event()
        self._history = History()
        self.sizes = BatchSizes(name)
        self._running: list[list[_Entry[T, R]]] = []
        self.stall_s = stall_s
        self._progress_at = time.monotonic()
        self.supervisor = Supervisor(f"batcher-{name}", self._run_forever, on_failure=self._fail_owned, policy=restart)

    def start(self) -> None:
        self.supervisor.start()

    async def close(self) -> None:
        await self.supervisor.stop()
        for entry in self._queue:
            if not entry.future.done():
                entry.future.set_exception(Overloaded(self.name, 1))
        self._queue.clear()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def stalled(self) -> bool:
        """Items wait or run, and the model made no progress for `stall_s`."""
        self._prune()
        return bool(self._queue or self._running) and time.monotonic() - self._progress_at > self.stall_s

    def _progressed(self) -> None:
        self._progress_at = time.monotonic()

    def _fail_owned(self, exc: BaseException) -> None:
        """The loop raised: fail the batch it was running (and, when it will not restart, what waits for it)."""
        failure = ModelFailed(f"the {self.name} model's loop failed: {type(exc).__name__}: {exc}")
        owned = [entry for entries in self._running for entry in entries]
        if self.supervisor.state == "failed":
            owned.extend(self._queue)
            self._queue.clear()
        self._running = []
        self._running_background = False
        for entry in owned:
            if not entry.future.done():
                entry.future.set_exception(failure)
        self._progressed()

    @contextmanager
    def admission(self, count: int) -> Iterator[None]:
        """Reserve room for `count` items that this request will submit, or raise `Overloaded` now."""
        self._prune()
        with self.gate.admission(count):
            yield

    async def submit(
        self, items: Sequence[T], *, timeout_s: float, background: bool = False, on_tokens: TokenSink | None = None
    ) -> list[R]:
        """Compute `items` (all or none enqueued) within `timeout_s`, else `DeadlineExceeded`. `on_tokens` is
        never called: a batch has no steps to report.

        A caller cancelled or timed out drops its items that have not started yet, and stops those being computed.
        """
        self._prune()
        if self.supervisor.state == "failed":
            raise ModelFailed(
                f"the {self.name} model's loop is down after repeated failures "
                f"({self.supervisor.last_error}); the process needs a restart"
            )
        if not (self._queue or self._running):
            self._progressed()
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A background batch already running counts as one this item waits behind.
        seen = self._background_batches - self._running_background
        entries = [_Entry(item, loop.create_future(), now, background, seen) for item in items]
        self.gate.take(self._computations([*self._queue, *entries]) - self._computations(self._queue))
        self._queue.extend(entries)
        self._history.arrived_since += len(entries)
        metrics.SCHEDULER_QUEUE_DEPTH.labels(self.name).set(len(self._queue))
        self._wakeup.set()
        return await answers(self.name, entries, timeout_s)

    def _key(self, entry: _Entry[T, R]) -> Hashable:
        """Entries with equal keys are computed once when they share a batch."""
        key = self.dedup_key_of(entry.item)
        return id(entry) if key is None else key

    def _computations(self, entries: Iterable[_Entry[T, R]]) -> int:
        return len({self._key(entry) for entry in entries})

    def _retry_after_s(self) -> float:
        batches_ahead = len(self._queue) / self.max_batch_size + 1
        return max(1.0, math.ceil(self._history.duration_s * batches_ahead))

    def _prune(self) -> None:
        live = deque(e for e in self._queue if not e.future.done())
        if dropped := len(self._queue) - len(live):
            metrics.SCHEDULER_DROPPED.labels(self.name, "cancelled").inc(dropped)
            self._queue = live

    async def _run_forever(self) -> None:
        while True:
            self._prune()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._linger()
            batch = self._take_batch()
            metrics.SCHEDULER_QUEUE_DEPTH.labels(self.name).set(len(self._queue))
            if batch:
                await self._execute(batch)

    async def _linger(self) -> None:
        await self._history.linger(self._wakeup, self._pruned_length, self.max_batch_size, self.max_wait_s)

    def _pruned_length(self) -> int:
        self._prune()
        return len(self._queue)

    def _take_batch(self) -> list[list[_Entry[T, R]]]:
        """The oldest interactive item's group (else the oldest background item's), in arrival order, up to
        `max_batch_size` (`background_max_size`) distinct items."""
        self._prune()
        if not self._queue:
            return []
        background = all(entry.background for entry in self._queue)
        limit = self.background_max_size if background else self.max_batch_size
        first = next(entry for entry in self._queue if entry.background == background)
        group = self.group_of(first.item)
        batch: dict[Hashable, list[_Entry[T, R]]] = {}
        for entry in self._queue:
            if entry.background == background and self.group_of(entry.item) == group:
                key = self._key(entry)
                if key in batch:
                    batch[key].append(entry)
                elif len(batch) < limit:
                    batch[key] = [entry]
        taken = {id(entry) for entries in batch.values() for entry in entries}
        rest: deque[_Entry[T, R]] = deque()
        for entry in self._queue:
            if id(entry) in taken:
                continue
            # An interactive batch promotes the background items equal to one of its own: computed once, now.
            if not background and self.group_of(entry.item) == group and (key := self._key(entry)) in batch:
                batch[key].append(entry)
            else:
                rest.append(entry)
        self._queue = rest
        return list(batch.values())

    def _call(self, items: list[T], abandoned: Abandoned) -> Sequence[R | Aborted]:
        """Runs in the executor: one model call, with its metrics."""
        groups = len({self.group_of(item) for item in items})
        metrics.MODEL_BATCHES.labels(self.name, str(groups)).inc()
        metrics.MODEL_ITEMS.labels(self.name).inc(len(items))
        self.sizes.record(len(items))
        self._progressed()
        try:
            with metrics.MODEL_BATCH_SECONDS.labels(self.name).time():
                results = self.compute(items, abandoned)
        finally:
            self._progressed()
        if len(results) != len(items):
            raise RuntimeError(f"{self.name} returned {len(results)} results for {len(items)} items")
        return results

    def _bisect(self, items: list[T], abandoned: Abandoned, first: int = 0) -> list[R | Aborted | BaseException]:
        """The outcomes of `items` (a batch that failed), each half called again and a failing half split again;
        `first` is the index of items[0] in the batch, which `abandoned` takes."""
        outcomes: list[R | Aborted | BaseException] = []
        middle = len(items) // 2
        for start, part in ((0, items[:middle]), (middle, items[middle:])):
            if not part:
                continue

            def shifted(i: int, at: int = first + start) -> bool:
                return abandoned(at + i)

            try:
                outcomes.extend(self._call(part, shifted))
            except Exception as exc:
                if len(part) > 1:
                    outcomes.extend(self._bisect(part, abandoned, first + start))
                    continue
                metrics.MODEL_ITEM_FAILURES.labels(self.name).inc()
                log.exception("%s failed on one item; its batch-mates are unaffected", self.name)
                outcomes.append(exc)
        return outcomes

    async def _execute(self, batch: list[list[_Entry[T, R]]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait = metrics.SCHEDULER_QUEUE_WAIT.labels(self.name)
        behind = metrics.SCHEDULER_BACKGROUND_WAITED.labels(self.name)
        background = batch[0][0].background
        for entries in batch:
            for entry in entries:
                wait.observe(started - entry.enqueued_at)
                if not entry.background:
                    behind.observe(self._background_batches - entry.background_batches_before)
        self._background_batches += background
        if background:
            metrics.SCHEDULER_BACKGROUND_ITEMS.labels(self.name).inc(len(batch))
        self._running_background = background
        items = [entries[0].item for entries in batch]
        self._running = batch
        liveness = _Liveness(batch, self._progressed)
        try:
            outcomes: Sequence[R | Aborted | BaseException] = await loop.run_in_executor(
                self.executor, self._call, items, liveness
            )
        except Exception:
            log.warning("%s batch of %d failed; bisecting it", self.name, len(items))
            outcomes = await loop.run_in_executor(self.executor, self._bisect, items, liveness)
        for index, (entries, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            if isinstance(outcome, Aborted):
                metrics.SCHEDULER_ABORTED.labels(self.name, liveness.reason(index)).inc()
                continue
            for entry in entries:
                if entry.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    failure = ModelFailed(f"the {self.name} model failed on this input: {outcome}")
                    entry.future.set_exception(failure)
                else:
                    entry.future.set_result(outcome)
        self._running = []
        self._running_background = False
        finished = loop.time()
        self._history = History(
            done_at=finished, duration_s=finished - started, callers=sum(len(entries) for entries in batch)
        )

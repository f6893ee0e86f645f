"""Continuous (iteration-level) batching for the generator: rows join and leave the running batch at every step.

Semantics (the continuous `Batcher` of interface.py; `MicroBatcher` in static.py is the alternative,
`GENERATOR_SCHEDULER=static`):

- One decoding loop per model runs in the executor while there is work, one turn (admissions, then one step) per
  executor task: each turn queues the next, so other work on the same thread (the classifier's batches) runs
  between two steps instead of after the whole batch. Between two decoding steps it drops finished and abandoned
  rows and admits waiting ones: their prefill is one forward pass, then they merge into the running batch's KV
  cache (server/ml/decoding.py). A row's tokens never depend on its neighbours, and rows with different sampling
  parameters share steps (temperature, top_p, seed are per row).
- When rows join: an idle model admits at once. A prefill is a forward pass of its own, so while rows run, waiting
  rows join once they number at least `JOIN_FRACTION` of the running batch or the oldest has waited
  `JOIN_AFTER_STEPS` steps. After the running batch drained, the loop lingers for the callers it just answered,
  as `MicroBatcher` does: until as many arrived, at most `max(max_wait_s, LINGER_FRACTION * their batch time)`,
  where their batch time is the longest the rows answered last spent in the batch (joined to finished), as a
  static batch's duration is its rows'. Not the loop's busy period, which grows with the load's length: a lone
  request arriving after the load ended could wait a tenth of it.
- Two priority classes: interactive rows always join first; background rows (the batch offload's `local` provider)
  join only when no interactive row waits or runs (each join is a prefill that delays the running rows' next step),
  and at most `background_max_size` of them run at once, so an interactive arrival joins at the next admission
  instead of waiting for a batch to end. While interactive rows run, background rows sit out (parked, their KV
  cache kept) and rejoin after, so they do not slow the interactive steps either
  (`scheduler_background_batches_waited` observes, per interactive row, the background admissions while it waited).
- Bounded queue and whole-request admission: as `MicroBatcher` (`AdmissionGate`): 503 past `queue_limit` waiting
  rows, and a request that gets 503 has had none of its rows computed. A job that joins an existing row takes no
  room.
- Deadlines and disconnects: a caller that times out (504) or is cancelled leaves its row; a row with no caller
  left is dropped before the next step (`scheduler_abort_steps` observes the steps in between: at most one).
- Equal deterministic jobs share one row; a caller that joins a running row first receives its tokens so far. Each
  caller keeps its own deadline, and an interactive caller makes a background row interactive.
- Streaming: a caller's `on_tokens(token_ids, logprobs)` runs on the event loop after each step that gave its row
  tokens (`logprobs`: theirs, when the row reports them, else empty).
- Failure isolation: a forward pass that raises dissolves its batch and its rows are bisected, one pass per turn
  between the running batch's steps (which go on, and admit new arrivals): half of the suspects is prefilled again,
  resumed from the tokens it had; a half that passes rejoins the running batch, a half that fails becomes the
  suspects and the other half waits, cleared, to rejoin in one pass once the guilty row is found. One guilty row
  among n costs log2(n) + 1 passes; it fails its callers with `ModelFailed` (500), the others finish.
  Running out of memory (`torch.OutOfMemoryError`) blames the batch's size, not a row: the rows of a pass that ran
  out run again one at a time, each alone in the batch and resumed from its tokens, while new arrivals wait; a
  row that runs out of memory alone fails, the others finish.
- Supervision (server/core/supervisor.py): an error that escapes a turn (outside the forward passes: the KV-cache
  surgery when rows join, leave or park) fails the rows the loop owned (running, parked, being bisected) with a
  `ModelFailed` naming it, and the loop restarts with the rows still waiting; `restart.give_up_after` failures
  within `restart.window_s` and it stays down (state `failed`). `stalled`: rows wait or run and no forward pass
  ran for `stall_s` (the clock starts when an idle batcher gets work). `/health` reads both.
"""

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import torch

from server.core import metrics
from server.core.supervisor import RestartPolicy, Supervisor
from server.ml.decoding import DecodeBatch, GenerationParams
from server.ml.decoding import Sequence as DecodedSequence
from server.ml.generator import Generation, TextGenerator
from server.ml.sampling import TokenLogprob
from server.services.errors import ModelFailed, Overloaded
from server.services.scheduling.admission import AdmissionGate, History, answers
from server.services.scheduling.interface import AbandonReason, BatchSizes, TokenSink

T = TypeVar("T")
log = logging.getLogger(__name__)
JOIN_FRACTION = 0.25
JOIN_AFTER_STEPS = 4


class Job(Hashable, Protocol):
    # Read-only: the jobs are frozen dataclasses.
    @property
    def prompt_ids(self) -> tuple[int, ...]: ...

    @property
    def params(self) -> GenerationParams: ...

    @property
    def seed(self) -> int | None: ...

    @property
    def deterministic(self) -> bool: ...


@dataclass(eq=False)
class _Caller:
    future: "asyncio.Future[Generation]"
    on_tokens: TokenSink | None
    background: bool
    abandoned_because: AbandonReason = "cancelled"


@dataclass(eq=False)
class _Row(DecodedSequence):
    """A sequence and who waits for it. The event loop owns `callers`, `delivered` and `gone`; the loop thread
    owns the decoding state and `sent` (tokens handed to the event loop so far)."""

    job: Job | None = None
    callers: list[_Caller] = field(default_factory=list)
    enqueued_at: float = 0.0
    enqueued_step: int = 0
    joined_at: float = 0.0  # when its last prefill ran (time.monotonic)
    delivered: list[int] = field(default_factory=list)
    delivered_logprobs: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0
    gone: bool = False
    gone_at_step: int = 0
    failure: str = ""  # why the pass that made it a suspect failed
    background_before: int = 0

    @property
    def background(self) -> bool:
        return all(caller.background for caller in self.callers)


@dataclass
class _Update:
    row: _Row
    tokens: list[int]
    outcome: Generation | BaseException | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ContinuousBatcher:
    def __init__(
        self,
        name: str,
        generator: TextGenerator,
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_limit: int,
        background_max_size: int | None = None,
        restart: RestartPolicy = RestartPolicy(),
        stall_s: float = 30.0,
    ):
        self.name = name
        self.generator = generator
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.background_max_size = background_max_size or max_batch_size
        self.max_wait_s = max_wait_s
        self.gate = AdmissionGate(name, queue_limit, lambda: len(self._waiting), self._retry_after_s)
        self.steps = 0
        self._background_admissions = 0
        self._background_prefilling = 0
        self._lock = threading.Lock()
        self._waiting: deque[_Row] = deque()
        self._batch: DecodeBatch[_Row] | None = None
        self._parked: DecodeBatch[_Row] | None = None
        self._rows: set[_Row] = set()
        self._shared: dict[Job, _Row] = {}
        self._wakeup = asyncio.Event()
        self._history = History()
        self.sizes = BatchSizes(name)
        self._finished_callers = 0
        self._finished_batch_s = 0.0
        self._step_seconds = 0.0
        self._row_steps = 16.0
        self._closing = False
        # Rows taken out of the batch by a failed forward pass: groups known to hold a guilty row, and rows cleared
        # by the bisection that wait to rejoin together.
        self._suspects: deque[list[_Row]] = deque()
        self._cleared: list[_Row] = []
        # Rows of a pass that ran out of memory, to run one at a time.
        self._alone: deque[_Row] = deque()
        self.stall_s = stall_s
        self._progress_at = time.monotonic()
        self.supervisor = Supervisor(f"batcher-{name}", self._run_forever, on_failure=self._fail_owned, policy=restart)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.supervisor.start()

    async def close(self) -> None:
        self._closing = True
        await self.supervisor.stop()
        for row in self._rows:
            for caller in row.callers:
                if not caller.future.done():
                    caller.future.set_exception(Overloaded(self.name, 1))
        self._rows.clear()

    @property
    def queued(self) -> int:
        """Callers whose rows wait to join the running batch."""
        with self._lock:
            return sum(len(row.callers) for row in self._waiting)

    @property
    def running(self) -> int:
        batch = self._batch
        return len(batch) if batch is not None else 0

    @property
    def stalled(self) -> bool:
        """Rows wait or run, and no forward pass ran for `stall_s`."""
        return bool(self._rows) and time.monotonic() - self._progress_at > self.stall_s

    def _fail_owned(self, exc: BaseException) -> None:
        """On the event loop, after the loop's turn raised (the torch thread runs none of this batcher's turns
        now): fail every row the loop had taken from the queue; the rows still waiting are the next loop's."""
        failure = ModelFailed(f"the {self.name} model's decoding loop failed: {type(exc).__name__}: {exc}")
        with self._lock:
            # A loop that will not restart owns the waiting rows too: nobody else would answer them.
            waiting = set(self._waiting) if self.supervisor.state != "failed" else set()
            self._waiting = deque(row for row in self._waiting if row in waiting)
        owned = [row for row in self._rows if row not in waiting]
        self._batch = self._parked = None
        self._suspects.clear()
        self._cleared = []
        self._alone.clear()
        for row in owned:
            self._forget(row)
            for caller in row.callers:
                if not caller.future.done():
                    caller.future.set_exception(failure)
        metrics.GENERATOR_RUNNING.labels(self.name).set(0)
        self._progress_at = time.monotonic()

    @contextmanager
    def admission(self, count: int) -> Iterator[None]:
        """Reserve room for `count` rows that this request will submit, or raise `Overloaded` now."""
        with self.gate.admission(count):
            yield

    def _retry_after_s(self) -> float:
        batches_ahead = self.queued / self.max_batch_size + 1
        return max(1.0, math.ceil(self._step_seconds * self._row_steps * batches_ahead))

    async def submit(
        self, items: Sequence[Job], *, timeout_s: float, background: bool = False, on_tokens: TokenSink | None = None
    ) -> list[Generation]:
        """Generate for `items` (all or none enqueued) within `timeout_s`, else `DeadlineExceeded`; `on_tokens`
        receives each row's new token ids as they come (one call per row per step)."""
        self._refuse_if_down()
        self.gate.take(
            sum(not job.deterministic for job in items)
            + len({job for job in items if job.deterministic and job not in self._shared})
        )
        loop = asyncio.get_running_loop()
        callers = [_Caller(loop.create_future(), on_tokens, background) for _ in items]
        for job, caller in zip(items, callers, strict=True):
            self._subscribe(job, caller, time.monotonic())
        metrics.SCHEDULER_QUEUE_DEPTH.labels(self.name).set(self.queued)
        self._wakeup.set()
        return await answers(self.name, callers, timeout_s)

    def _refuse_if_down(self) -> None:
        if self.supervisor.state == "failed":
            raise ModelFailed(
                f"the {self.name} model's loop is down after repeated failures "
                f"({self.supervisor.last_error}); the process needs a restart"
            )

    def _subscribe(self, job: Job, caller: _Caller, now: float) -> None:
        row = self._shared.get(job) if job.deterministic else None
        if row is None:
            if not self._rows:
                self._progress_at = now
            row = _Row(
                job.prompt_ids,
                job.params,
                job.seed,
                job=job,
                callers=[caller],
                enqueued_at=now,
                enqueued_step=self.steps,
                # A background prefill under way counts as one this row waits behind.
                background_before=self._background_admissions - self._background_prefilling,
            )
            self._rows.add(row)
            if job.deterministic:
                self._shared[job] = row
            with self._lock:
                self._waiting.append(row)
            self._history.arrived_since += 1
        else:
            row.callers.append(caller)
            if on_tokens := caller.on_tokens:
                if row.delivered:
                    on_tokens(list(row.delivered), list(row.delivered_logprobs))
        caller.future.add_done_callback(partial(self._left, row))

    def _left(self, row: _Row, future: asyncio.Future) -> None:
        if row.gone or not all(caller.future.done() for caller in row.callers):
            return
        row.gone, row.gone_at_step = True, self.steps
        self._forget(row)

    def _forget(self, row: _Row) -> None:
        self._rows.discard(row)
        if row.job is not None and self._shared.get(row.job) is row:
            del self._shared[row.job]

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._linger()
            # Lingering is the loop's choice, not a stall: the stall clock counts from here.
            self._progress_at = time.monotonic()
            drained: Future[None] = Future()
            # Running from the start: the loop cannot be cancelled mid-turn, it ends at the next turn (`_closing`).
            drained.set_running_or_notify_cancel()
            self.executor.submit(self._turn, drained)
            await asyncio.wrap_future(drained)
            finished = loop.time()
            # Rows waiting now arrived after the loop's last look, that is after the batch drained.
            self._history = History(
                done_at=finished,
                duration_s=self._finished_batch_s,
                callers=self._finished_callers,
                arrived_since=len(self._waiting),
            )

    async def _linger(self) -> None:
        await self._history.linger(self._wakeup, lambda: len(self._waiting), self.max_batch_size, self.max_wait_s)

    # Everything below runs on the torch thread (the executor), one turn at a time.

    def _turn(self, drained: Future[None]) -> None:
        """One turn of the loop; queues the next one, or resolves `drained` once no row runs and none waits (or
        the batcher closes)."""
        try:
            with torch.inference_mode():
                self._retire()
                self._bisect()
                if not self._alone and (joining := self._take()):
                    self._prefill(joining)
                self._park_or_resume()
                self._retire()
                if self.running:
                    self._step()
            if self._closing or not (self.running or self._waiting or self._suspects or self._cleared or self._alone):
                drained.set_result(None)
            else:
                self.executor.submit(self._turn, drained)
        except BaseException as exc:
            drained.set_exception(exc)

    def _take(self) -> list[_Row]:
        """The waiting rows that join now (see the module's docstring), oldest first."""
        with self._lock:
            live = [row for row in self._waiting if not row.gone]
            if dropped := len(self._waiting) - len(live):
                metrics.SCHEDULER_DROPPED.labels(self.name, "cancelled").inc(dropped)
            self._waiting = deque(live)
            running = self._batch.sequences if self._batch is not None else []
            if not live:
                return []
            # Rows under bisection come back: their places stay theirs.
            room = (
                self.max_batch_size
                - len(running)
                - len(self._cleared)
                - len(self._alone)
                - sum(len(group) for group in self._suspects)
            )
            interactive = [row for row in live if not row.background]
            candidates = interactive
            if not interactive and all(row.background for row in running):
                background_running = len(running) + (len(self._parked) if self._parked is not None else 0)
                room = min(room, self.background_max_size - background_running)
                candidates = live
            due = (
                (
                    not running
                    or len(candidates) >= JOIN_FRACTION * len(running)
                    or self.steps - candidates[0].enqueued_step >= JOIN_AFTER_STEPS
                )
                if candidates
                else False
            )
            chosen = candidates[: max(room, 0)] if due else []
            for row in chosen:
                self._waiting.remove(row)
        metrics.SCHEDULER_QUEUE_DEPTH.labels(self.name).set(self.queued)
        return chosen

    def _prefill(self, rows: list[_Row]) -> None:
        wait = metrics.SCHEDULER_QUEUE_WAIT.labels(self.name)
        now = time.monotonic()
        for row in rows:
            wait.observe(now - row.enqueued_at)
        metrics.MODEL_ITEMS.labels(self.name).inc(len(rows))
        behind = metrics.SCHEDULER_BACKGROUND_WAITED.labels(self.name)
        for row in rows:
            if not row.background:
                behind.observe(self._background_admissions - row.background_before)
        if background := sum(row.background for row in rows):
            metrics.SCHEDULER_BACKGROUND_ITEMS.labels(self.name).inc(background)
            self._background_admissions += 1
        self._background_prefilling = int(background > 0)
        try:
            self._join(rows)
        finally:
            self._background_prefilling = 0

    def _join(self, rows: list[_Row]) -> bool:
        """Prefill `rows` (resumed from the tokens they have) into the running batch; False when the pass failed
        (the rows are then suspects)."""
        joined_at = time.monotonic()
        for row in rows:
            row.joined_at = joined_at
        try:
            joined = self._forward("prefill", rows, lambda: self.generator.decoder.prefill(list(rows)))
        except Exception as exc:
            self._failed(rows, exc)
            return False
        if self._batch is None or not len(self._batch):
            self._batch = joined
        else:
            self._batch.extend(joined)
        self._send([self._update(row) for row in rows])
        return True

    def _bisect(self) -> None:
        """One pass of the bisection of failed rows, or the next row that ran out of memory once the batch is empty
        (see the module's docstring)."""
        if self._alone:
            while self._alone and self._alone[0].gone:
                self._alone.popleft()
            if self._alone and not self.running:
                self._join([self._alone.popleft()])
        elif self._suspects:
            suspects = [row for row in self._suspects.popleft() if not row.gone]
            if len(suspects) == 1:
                self._fail_row(suspects[0], suspects[0].failure)
            elif suspects:
                half, rest = suspects[: len(suspects) // 2], suspects[len(suspects) // 2 :]
                if self._join(half):
                    self._suspects.appendleft(rest)
                else:
                    # `_failed` queued `half` as the suspects; the rest is cleared, since one pass over all failed.
                    self._cleared.extend(rest)
        elif self._cleared:
            cleared, self._cleared = [row for row in self._cleared if not row.gone], []
            if cleared:
                self._join(cleared)

    def _step(self) -> None:
        batch = self._batch
        assert batch is not None, "a turn steps only while rows run"
        try:
            self._forward("decode", batch.sequences, lambda: self.generator.decoder.step(batch))
        except Exception as exc:
            self._batch = None
            self._failed(batch.sequences, exc)
            return
        self.steps += 1
        self._send([self._update(row) for row in batch.sequences])

    def _forward(self, kind: str, rows: Sequence[DecodedSequence], call: Callable[[], T]) -> T:
        metrics.MODEL_BATCHES.labels(self.name, "1").inc()
        self.sizes.record(len(rows))
        metrics.GENERATOR_FORWARDS.labels(self.name, kind).inc()
        started = time.perf_counter()
        try:
            with metrics.MODEL_BATCH_SECONDS.labels(self.name).time():
                result = call()
        finally:
            self._progress_at = time.monotonic()
        if kind == "decode":
            self._step_seconds = time.perf_counter() - started
        return result

    def _failed(self, sequences: Sequence[DecodedSequence], exc: Exception) -> None:
        """A forward pass raised: a lone row fails; several become suspects, bisected from the next turn on."""
        rows = [row for row in sequences if isinstance(row, _Row)]
        if len(rows) == 1:
            self._fail_row(rows[0], f"{type(exc).__name__}: {exc}")
            return
        # A step that raised midway may have finished some rows: they are answered, not re-run.
        done = [row for row in rows if row.finish_reason]
        self._send([self._update(row) for row in done])
        suspects = [row for row in rows if not row.finish_reason]
        if suspects and isinstance(exc, torch.OutOfMemoryError):
            log.warning(
                "%s ran out of memory over %d rows (%s); they run again one at a time", self.name, len(rows), exc
            )
            self._alone.extend(suspects)
        elif suspects:
            log.warning("%s forward pass over %d rows failed (%s); bisecting them", self.name, len(rows), exc)
            for row in suspects:
                row.failure = f"{type(exc).__name__}: {exc}"
            self._suspects.appendleft(suspects)

    def _fail_row(self, row: _Row, cause: str) -> None:
        metrics.MODEL_ITEM_FAILURES.labels(self.name).inc()
        log.error("%s failed on one row (%s); its batch-mates are unaffected", self.name, cause)
        self._send([_Update(row, [], ModelFailed(f"the {self.name} model failed on this input: {cause}"))])

    def _update(self, row: _Row) -> _Update:
        limit = row.kept if row.finish_reason else len(row.tokens)
        tokens, logprobs = row.tokens[row.sent : limit], row.logprobs[row.sent : limit]
        row.sent = max(row.sent, limit)
        outcome = self.generator.result(row) if row.finish_reason else None
        return _Update(row, tokens, outcome, logprobs)

    def _park_or_resume(self) -> None:
        """Background rows sit out the steps of interactive rows (their cache kept aside, intact), and rejoin when
        no interactive row runs any more, or when one of them gained an interactive caller."""
        batch, parked = self._batch, self._parked
        rows = batch.sequences if batch is not None else []
        interactive = any(not row.background for row in rows)
        if parked is not None and (not interactive or not all(row.background for row in parked.sequences)):
            self._parked = None
            if batch is None or not len(batch):
                self._batch = parked
            else:
                batch.extend(parked)
        elif batch is not None and interactive and not all(not row.background for row in rows):
            moved = batch.split([i for i, row in enumerate(rows) if row.background])
            if parked is None:
                self._parked = moved
            else:
                parked.extend(moved)

    def _retire(self) -> None:
        """Drop finished rows and rows nobody waits for any more from the running batch."""
        batch = self._batch
        if batch is None:
            return
        keep = []
        for index, row in enumerate(batch.sequences):
            if row.finish_reason:
                continue
            if row.gone:
                metrics.SCHEDULER_ABORTED.labels(self.name, row.callers[0].abandoned_because).inc()
                metrics.SCHEDULER_ABORT_STEPS.labels(self.name).observe(self.steps - row.gone_at_step)
                continue
            keep.append(index)
        if done := [row for row in batch.sequences if row.finish_reason]:
            self._finished_callers = sum(len(row.callers) for row in done)
            self._finished_batch_s = time.monotonic() - min(row.joined_at for row in done)
            self._row_steps = 0.9 * self._row_steps + 0.1 * sum(len(row.tokens) for row in done) / len(done)
        if len(keep) < len(batch):
            batch.keep(keep)
        metrics.GENERATOR_RUNNING.labels(self.name).set(len(batch))

    def _send(self, updates: list[_Update]) -> None:
        updates = [u for u in updates if u.tokens or u.outcome is not None]
        if updates and self._loop is not None and not self._closing:
            self._loop.call_soon_threadsafe(self._deliver, updates)

    def _deliver(self, updates: list[_Update]) -> None:
        """On the event loop: stream new tokens to callers, then answer finished rows."""
        for update in updates:
            row = update.row
            row.delivered.extend(update.tokens)
            row.delivered_logprobs.extend(update.logprobs)
            for caller in row.callers:
                if update.tokens and caller.on_tokens is not None and not caller.future.done():
                    caller.on_tokens(update.tokens, update.logprobs)
            if update.outcome is None:
                continue
            self._forget(row)
            for caller in row.callers:
                if caller.future.done():
                    continue
                if isinstance(update.outcome, BaseException):
                    caller.future.set_exception(update.outcome)
                else:
                    caller.future.set_result(update.outcome)

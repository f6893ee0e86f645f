"""The contract every scheduler keeps, whichever `GENERATOR_SCHEDULER` picks: `MicroBatcher` (static.py, batch by
batch; the classifier's scheduler too) or `ContinuousBatcher` (continuous.py, rows join and leave at every
decoding step). The services (`serving/`) hold a `Batcher` and never ask which one it is.

A `Batcher[T, R]` turns items `T` into results `R` on one model, on the torch thread:

- `submit(items, timeout_s=, background=, on_tokens=)` enqueues all of `items` or none, and returns their results in
  order. Past `timeout_s` it raises `DeadlineExceeded` (504); a caller that leaves (timeout, cancelled task) stops
  its items: those still waiting are never computed, those running stop at their next step. A failing item fails
  only its own callers (`ModelFailed`, 500): the others in its batch finish.
- `background=True` marks offloaded work (the batch offload's `local` provider): it runs only when no interactive
  item waits, in batches of at most `background_max_size`, and has `BACKGROUND_TIMEOUT_S` as its deadline.
- `on_tokens(token_ids, logprobs)` receives each item's new tokens after every decoding step, on the event loop, for
  schedulers that decode step by step (continuous); the static scheduler has no steps to report and never calls it:
  its callers get each text whole.
- `admission(n)` reserves room for a request's n items before any is submitted, or raises `Overloaded` (503 with
  Retry-After) at once; submits inside it draw on the reservation, so a request that gets 503 had nothing
  computed. A request larger than the whole queue raises `InputError` (422) instead: it could never be admitted.
- Equal deterministic items share one computation (and a place in the queue).
- `start()` and `close()` bracket the scheduler's loop, which runs under a `Supervisor` (`supervisor`: restarted
  after an escaped error, down for good after repeated ones); `queued` (items waiting) and `stalled` (work waits or
  runs and the model made no progress for `stall_s`) are what `/health` reads; `sizes` what the live figures read.
"""

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from server.core import metrics
from server.core.supervisor import Supervisor
from server.ml.sampling import TokenLogprob

T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)
# Background work waits behind every interactive request, so its deadline only bounds a stuck model.
BACKGROUND_TIMEOUT_S = 3600.0
AbandonReason = Literal["deadline", "cancelled"]
TokenSink = Callable[[list[int], list[TokenLogprob]], None]


@dataclass
class BatchSizes:
    """The model calls a scheduler made and the items they computed, since the process started (also observed in
    `model_batch_size{model}`). Written on the torch thread, read on the event loop: ints, never torn."""

    model: str
    batches: int = 0
    items: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        metrics.MODEL_BATCH_SIZE.labels(self.model).observe(size)


class Batcher(Protocol[T_contra, R_co]):
    name: str
    supervisor: Supervisor
    sizes: BatchSizes

    def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def queued(self) -> int: ...

    @property
    def stalled(self) -> bool: ...

    def admission(self, count: int) -> AbstractContextManager[None]: ...

    async def submit(
        self,
        items: Sequence[T_contra],
        *,
        timeout_s: float,
        background: bool = False,
        on_tokens: TokenSink | None = None,
    ) -> Sequence[R_co]: ...

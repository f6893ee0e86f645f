"""The knobs the three fake batch APIs share, and the lifecycle of one fake batch (how many polls it has seen, how it
ended, which of its items finished)."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Outcome = Literal["completed", "failed", "expired", "cancelled"]
T = TypeVar("T")


def _no_item_fails(key: str) -> bool:
    return False


@dataclass
class BatchBehaviour:
    """How a fake batch API behaves. Tests may change any field at any time; the fake reads them under its lock.

    Batches are numbered 1, 2, ... in the order the fake accepted them (refused creates get no number)."""

    polls_to_complete: int = 1
    """A batch ends on its N-th status read (retrieve / get); earlier reads show it running."""
    out_of_order: bool = False
    """Results come in the reverse of request order, so a client that matches on order breaks."""
    fail_item: Callable[[str], bool] = _no_item_fails
    """Items (by custom_id / key; Anthropic: or by the text of the item's last message, as a client may send its
    own custom_ids) that finish with the provider's per-item error."""
    failed_batches: set[int] = field(default_factory=set)
    """Batch numbers that fail provider-side as a whole, while the others succeed."""
    expired_batches: set[int] = field(default_factory=set)
    """Batch numbers that expire with only `done_fraction` of their items finished."""
    done_fraction: float = 0.5
    """Share of items (the first ones, rounded up) finished when a batch expires or is cancelled."""
    create_429s: int = 0
    """The next K batch-create calls answer 429 with a Retry-After header."""
    retry_after_s: float = 1.0
    """The Retry-After value of every 429 (fractions are allowed so tests stay fast; the SDKs accept them)."""
    create_faults: list[str] = field(default_factory=list)
    """Faults of the next batch creates, one per create, in order: `502_after` (the batch is created, then a gateway
    answers 502 in its place), `reset_after` (created, then the connection is cut in the middle of the answer),
    `stall_after` (created, then the answer waits `stall_s`: past the client's timeout), `retry_after_long`
    (refused: 429 with a Retry-After of `long_retry_after_s`), None (no fault)."""
    stall_s: float = 5.0
    long_retry_after_s: float = 130.0
    hold_at: str | None = None
    """A step whose first answer the fake keeps back until `hold_at` changes (or the fake closes), after setting
    its `held` event: the test kills the client there. `create` (all three fakes: the batch was accepted, its answer
    is pending); OpenAI also `upload` (the input file was stored), `poll` (the status read that ends the batch
    was counted) and `results` (the output file was asked for)."""
    input_tokens: int = 12
    """Input tokens reported per item (and per real-time call)."""
    output_tokens: int = 7
    """Output tokens reported per generated item (embeddings report none)."""

    def take_create_429(self) -> bool:
        """Whether this create call is refused; consumes one of `create_429s`."""
        if self.create_429s <= 0:
            return False
        self.create_429s -= 1
        return True

    def take_create_fault(self) -> str | None:
        """The fault of this create call (consumed)."""
        return self.create_faults.pop(0) if self.create_faults else None

    def refusal(self, fault: str | None) -> str | None:
        """The Retry-After of a 429 refusing this create (with `fault`), None when it goes through."""
        if fault == "retry_after_long":
            return f"{self.long_retry_after_s:g}"
        return self.retry_after if self.take_create_429() else None

    @property
    def retry_after(self) -> str:
        """`retry_after_s` as a Retry-After header value: "1" rather than "1.0"."""
        return f"{self.retry_after_s:g}"

    def ordered(self, items: Sequence[T]) -> list[T]:
        return list(reversed(items)) if self.out_of_order else list(items)


@dataclass
class Lifecycle:
    """One batch's progress: it ends on the poll given by the behaviour, and its outcome and finished items are
    fixed at that moment."""

    number: int
    keys: list[str]
    polls: int = 0
    cancel_requested: bool = False
    invalid: bool = False
    outcome: Outcome | None = None
    finished: int = 0

    def poll(self, behaviour: BatchBehaviour) -> None:
        """Count one status read and end the batch if this read is the one that ends it."""
        self.polls += 1
        if self.outcome is not None:
            return
        if self.invalid or (self.polls >= behaviour.polls_to_complete and self.number in behaviour.failed_batches):
            self._end("failed", 0)
        elif self.cancel_requested:
            self._end("cancelled", self._partial(behaviour))
        elif self.polls >= behaviour.polls_to_complete:
            if self.number in behaviour.expired_batches:
                self._end("expired", self._partial(behaviour))
            else:
                self._end("completed", len(self.keys))

    def _partial(self, behaviour: BatchBehaviour) -> int:
        return min(len(self.keys), math.ceil(behaviour.done_fraction * len(self.keys)))

    def _end(self, outcome: Outcome, finished: int) -> None:
        self.outcome = outcome
        self.finished = finished

    @property
    def done_keys(self) -> list[str]:
        return self.keys[: self.finished]

    @property
    def undone_keys(self) -> list[str]:
        return self.keys[self.finished :]

    def succeeded(self, behaviour: BatchBehaviour) -> list[str]:
        return [key for key in self.done_keys if not behaviour.fail_item(key)]

    def errored(self, behaviour: BatchBehaviour) -> list[str]:
        return [key for key in self.done_keys if behaviour.fail_item(key)]

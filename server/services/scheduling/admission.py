"""What both schedulers share: admission to a bounded queue, whole per request; the linger after a batch; the
callers' answers under their deadline. Their semantics are the `Batcher` contract's (interface.py)."""

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from server.core import metrics
from server.core.aio import wait_event
from server.services.errors import DeadlineExceeded, FieldError, InputError, Overloaded
from server.services.scheduling.interface import AbandonReason

LINGER_FRACTION = 0.1


@dataclass(eq=False)
class _Grant:
    gate: "AdmissionGate"
    left: int


_grant: ContextVar[_Grant | None] = ContextVar("batch_admission", default=None)


class AdmissionGate:
    """A bounded queue's admission: room for `limit` waiting items, taken whole per request.

    `admission(n)` reserves room for a request's n items before any is submitted (or raises `Overloaded`), and
    `take(n)` at submit time draws on the reservation made in the same task (or a task it started) before
    taking fresh room, so a request that gets 503 has had none of its items computed."""

    def __init__(self, name: str, limit: int, waiting: Callable[[], int], retry_after_s: Callable[[], float]):
        self.name = name
        self.limit = limit
        self.waiting = waiting
        self.retry_after_s = retry_after_s
        self.reserved = 0

    def _check(self, count: int) -> None:
        if count > self.limit:
            # Never admissible, however long the caller waits: not a retryable 503.
            raise InputError(
                [
                    FieldError(
                        ("body",),
                        f"{count} items: more than the {self.name} model's queue holds "
                        f"(SCHEDULER_QUEUE_LIMIT={self.limit}); split the request",
                    )
                ]
            )
        if self.waiting() + self.reserved + count > self.limit:
            metrics.SCHEDULER_REJECTED.labels(self.name).inc(count)
            raise Overloaded(self.name, self.retry_after_s())

    @contextmanager
    def admission(self, count: int) -> Iterator[None]:
        self._check(count)
        grant = _Grant(self, count)
        self.reserved += count
        token = _grant.set(grant)
        try:
            yield
        finally:
            _grant.reset(token)
            self.reserved -= grant.left

    def take(self, count: int) -> None:
        grant = _grant.get()
        if grant is not None and grant.gate is self and grant.left >= count:
            grant.left -= count
            self.reserved -= count
        else:
            self._check(count)


@dataclass
class History:
    """What the last batch did, which decides how long to linger for its callers' next requests."""

    done_at: float = -math.inf
    duration_s: float = 0.0
    callers: int = 0
    arrived_since: int = 0

    async def linger(
        self, wakeup: asyncio.Event, waiting: Callable[[], int], max_batch_size: int, max_wait_s: float
    ) -> None:
        """Wait until the batch is full or as many arrived as the last batch answered, at the latest
        `max(max_wait_s, LINGER_FRACTION * the last batch's duration)` after it ended."""
        loop = asyncio.get_running_loop()
        give_up_at = self.done_at + max(max_wait_s, LINGER_FRACTION * self.duration_s)
        while waiting() < max_batch_size and self.arrived_since < self.callers:
            timeout = give_up_at - loop.time()
            if timeout <= 0:
                return
            wakeup.clear()
            if not await wait_event(wakeup, timeout):
                return


class Caller(Protocol):
    future: asyncio.Future
    abandoned_because: AbandonReason


async def answers(name: str, callers: Sequence[Caller], timeout_s: float) -> list:
    """The callers' results within `timeout_s`, else `DeadlineExceeded` (marking them abandoned for that reason);
    their futures are cancelled on the way out, which is how the batcher learns a caller is gone."""
    try:
        async with asyncio.timeout(timeout_s):
            return list(await asyncio.gather(*(caller.future for caller in callers)))
    except TimeoutError:
        for caller in callers:
            caller.abandoned_because = "deadline"
        raise DeadlineExceeded(f"the {name} model did not answer within {timeout_s:g} s (REQUEST_TIMEOUT_S)") from None
    finally:
        for caller in callers:
            caller.future.cancel()

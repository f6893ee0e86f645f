"""Hold a batcher's model calls at a gate, so tests can line requests up behind a busy model.

For the static `MicroBatcher` the gate wraps its compute function (one call per batch); for the
`ContinuousBatcher` it wraps the generator's prefill (one call per group of joining rows). Either way
`batches` lists the jobs each call started, in order."""

import asyncio
import threading
from collections.abc import Callable

from server.services.scheduling.continuous import ContinuousBatcher
from server.services.scheduling.static import MicroBatcher
from tests.support.waiting import until


class Gate:
    def __init__(
        self, batcher: MicroBatcher | ContinuousBatcher, fail_if: Callable[[list], bool] = lambda items: False
    ):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list] = []
        self.fail_if = fail_if
        if isinstance(batcher, ContinuousBatcher):
            decoder = batcher.generator.decoder
            prefill = decoder.prefill
            decoder.prefill = lambda rows: self._pass([row.job for row in rows], lambda: prefill(rows))
        else:
            compute = batcher.compute
            batcher.compute = lambda items, abandoned: self._pass(list(items), lambda: compute(items, abandoned))

    def _pass(self, items: list, call: Callable[[], object]) -> object:
        self.batches.append(items)
        self.entered.set()
        self.open.wait(30)
        if self.fail_if(items):
            raise RuntimeError("model exploded on this input")
        return call()

    async def wait_entered(self) -> None:
        await asyncio.to_thread(self.entered.wait, 10)


async def until_queued(batcher: MicroBatcher | ContinuousBatcher, items: int) -> None:
    """Wait until at least `items` wait in the batcher's queue, rather than a fixed time: a request gets there after
    a few awaits, and the CPU time for them, which a loaded machine may not give within a fixed wait."""
    await until(lambda: batcher.queued >= items)

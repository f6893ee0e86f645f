"""Hold a batcher's model calls at a gate, so tests can line requests up behind a busy model."""

import asyncio
import threading
from collections.abc import Callable

from server.services.batching import MicroBatcher


class Gate:
    def __init__(self, batcher: MicroBatcher, fail_if: Callable[[list], bool] = lambda items: False):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list] = []
        compute = batcher.compute

        def gated(items: list, abandoned) -> list:
            self.batches.append(list(items))
            self.entered.set()
            self.open.wait(30)
            if fail_if(items):
                raise RuntimeError("model exploded on this input")
            return compute(items, abandoned)

        batcher.compute = gated

    async def wait_entered(self) -> None:
        await asyncio.to_thread(self.entered.wait, 10)

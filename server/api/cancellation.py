"""Stop work for clients that have gone away.

Starlette does not cancel a handler when its client disconnects; without this, a batch would still
compute items nobody will read. Cancelling the work drops its items that have not started yet. The handler then
ends with `ClientClosed`, which `errors.py` answers 499 (nobody reads it): the metrics and the access log count a
client that left, not a 500 and a traceback.
"""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientClosed(Exception):
    """The client disconnected before its answer, and its work was cancelled."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise `ClientClosed`). A cancellation of
    the handler itself (a server shutting down) stays a `CancelledError`."""
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if left and not (current is not None and current.cancelling()):
            raise ClientClosed("the client left before its answer") from None
        raise
    finally:
        watcher.cancel()

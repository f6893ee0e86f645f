"""Small asyncio helpers shared by the background loops."""

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; True when it was set.

    Built on `asyncio.timeout`, not `asyncio.wait_for`: in Python 3.11 `wait_for` can swallow a cancellation that
    arrives just as the wait ends, and a background loop around it then never stops (a shutdown that hangs).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True

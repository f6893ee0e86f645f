"""Waiting in tests for what a step needs, not for a fixed time: a loaded CI machine may exceed any fixed wait."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable

# Bound at import: a test that replaces asyncio.sleep (tests/core/test_supervisor.py) still polls in real time.
_sleep = asyncio.sleep


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30.0, interval_s: float = 0.01
) -> None:
    """Return once `condition()` (a function, or one returning an awaitable) is true; TimeoutError after
    `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            met = condition()
            if inspect.isawaitable(met):
                met = await met
            if met:
                return
            await _sleep(interval_s)

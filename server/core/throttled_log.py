"""Warnings for conditions that repeat on every request (a dependency down): one line per interval per key.

The first warning of a key is logged at once; later ones within `interval_s` are counted, not logged; the
next line logged for that key says how many were suppressed since the previous one. Keys are independent
(one per failing component), so one component's flood never hides another's first line.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 30.0


@dataclass
class _KeyState:
    logged_at: float
    suppressed: int = 0


class ThrottledLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log `message % args` at WARNING unless `key` logged less than `interval_s` ago; True when logged."""
        now = self.clock()
        state = self._keys.get(key)
        if state is not None and now - state.logged_at < self.interval_s:
            state.suppressed += 1
            return False
        note = f"logged at most every {self.interval_s:.0f} s"
        if state is not None and state.suppressed:
            note += f"; {state.suppressed} similar suppressed in the last {now - state.logged_at:.0f} s"
        self._keys[key] = _KeyState(now)
        self.logger.warning(f"{message} ({note})", *args)
        return True

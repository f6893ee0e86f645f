"""A circuit breaker: after a dependency fails, skip it for a growing interval instead of waiting on it again.

States (`state`, and the `circuit_state{dependency}` gauge: 0 closed, 1 open, 2 half_open):
- closed: every call goes through.
- open: entered when a call fails with one of `failures` (a timeout, a connection error). Calls raise
  `CircuitOpen` at once, without touching the network, until the interval has passed: `base_interval_s`
  after the first failure, doubled after each failed probe, at most `max_interval_s`.
- half_open: the first call after the interval is the probe and goes through; calls meanwhile raise
  `CircuitOpen`. The probe succeeding closes the circuit (and resets the interval); failing reopens it
  with the next interval. A probe that ends without an answer either way (cancelled) leaves the circuit
  open with its interval elapsed, so the next call probes.
Any other outcome is an answer from the dependency, so a success: a Redis `ResponseError` proves Redis is up.
Calls already in flight when the circuit opens finish normally; their failures are counted
(`circuit_failures_total`) but do not lengthen the interval: one outage is one failure, whatever the
concurrency. Skipped calls are counted in `circuit_skipped_total`. Callbacks registered with `on_close` run when the
circuit closes again (work deferred while the dependency was skipped). The process's callers share one
breaker per dependency, so a dead dependency costs one timeout per interval, not one per request.
"""

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from server.core import metrics
from server.core.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[State, int] = {"closed": 0, "open": 1, "half_open": 2}


class CircuitOpen(Exception):
    """The call was skipped: the dependency failed recently and is not being tried until `retry_in_s`."""

    def __init__(self, dependency: str, retry_in_s: float, cause: str):
        super().__init__(
            f"{dependency} skipped for {retry_in_s:.2f} s more after {cause}"
            if retry_in_s > 0
            else f"{dependency} skipped while a probe is in flight after {cause}"
        )
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    def __init__(
        self,
        dependency: str,
        *,
        failures: tuple[type[BaseException], ...],
        base_interval_s: float = 0.5,
        max_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.dependency = dependency
        self.failures = failures
        self.base_interval_s = base_interval_s
        self.max_interval_s = max_interval_s
        self.clock = clock
        self._failed_probes = 0
        self._open = False
        self._probe: object | None = None
        self._retry_at = 0.0
        self._cause = ""
        self._opened_at = 0.0
        self._warnings = ThrottledLog(log)
        self._on_close: list[Callable[[], None]] = []
        self._publish()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop, synchronously) each time the circuit closes after being open."""
        self._on_close.append(callback)

    @property
    def state(self) -> State:
        if not self._open:
            return "closed"
        return "open" if self._probe is None else "half_open"

    @property
    def interval_s(self) -> float:
        """How long the circuit stays open after its latest failure."""
        return min(self.base_interval_s * 2**self._failed_probes, self.max_interval_s)

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Run the body as one call to the dependency, or raise `CircuitOpen` without running it."""
        probe = self._admit()
        try:
            yield
        except self.failures as exc:
            self._failed(probe, exc)
            raise
        except Exception:
            self._succeeded()
            raise
        except BaseException:
            if self._is_current(probe):
                self._probe = None
                self._publish()
            raise
        else:
            self._succeeded()

    def _admit(self) -> object | None:
        """A token when this call is the probe, None for a call made while closed; raises `CircuitOpen` when
        the call must be skipped."""
        if not self._open:
            return None
        retry_in_s = self._retry_at - self.clock()
        if self._probe is not None or retry_in_s > 0:
            metrics.CIRCUIT_SKIPPED.labels(self.dependency).inc()
            raise CircuitOpen(self.dependency, max(retry_in_s, 0.0), self._cause)
        self._probe = object()
        self._publish()
        return self._probe

    def _is_current(self, probe: object | None) -> bool:
        """Whether `probe` is the circuit's probe in flight (not one that an answer to another call outdated)."""
        return probe is not None and probe is self._probe

    def _failed(self, probe: object | None, exc: BaseException) -> None:
        metrics.CIRCUIT_FAILURES.labels(self.dependency).inc()
        probing = self._is_current(probe)
        if self._open and not probing:
            return
        now = self.clock()
        if probing:
            self._failed_probes += 1
            self._probe = None
        else:
            self._opened_at = now
        self._open = True
        self._cause = f"{type(exc).__name__}: {exc}"
        self._retry_at = now + self.interval_s
        self._publish()
        self._warnings.warning(
            self.dependency,
            "%s failed (%s): skipping it for %.1f s, then one call probes it",
            self.dependency,
            self._cause,
            self.interval_s,
        )

    def _succeeded(self) -> None:
        if not self._open:
            return
        log.info("%s answers again after %.1f s: circuit closed", self.dependency, self.clock() - self._opened_at)
        self._open = False
        self._probe = None
        self._failed_probes = 0
        self._publish()
        for callback in self._on_close:
            callback()

    def _publish(self) -> None:
        metrics.CIRCUIT_STATE.labels(self.dependency).set(STATE_VALUES[self.state])

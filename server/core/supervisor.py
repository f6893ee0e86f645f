"""Supervised background loops: the one mechanism that keeps every long-lived task of the server running.

Semantics:

- `Supervisor(name, body)` runs `await body()` in a task of its own. `body` is the loop: it runs until cancelled.
- An exception that escapes `body` (anything but the task's own cancellation) is logged with its traceback,
  counted in `background_task_failures_total{task}`, handed to `on_failure` (which fails the work the loop owned,
  so that no caller is left waiting for an answer that will never come), and `body` is started again after a
  backoff: `backoff_s`, doubled for each other failure within `window_s`, at most `max_backoff_s`.
- `give_up_after` failures within `window_s` (None: never) and the supervisor stops restarting: state `failed`.
  Such a loop cannot be restarted in this process; /health/live says so, and the orchestrator restarts the process.
- `body` returning is the loop's own decision to end: state `stopped`, no restart.
- States: `idle` (not started), `running`, `restarting` (between a failure and the restart), `failed`, `stopped`.
  Health checks read `state`, `failures` and `last_error`; what each state means for readiness is theirs to say.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from server.core import metrics

log = logging.getLogger(__name__)
State = Literal["idle", "running", "restarting", "failed", "stopped"]


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    window_s: float = 60.0
    give_up_after: int | None = None


class Supervisor:
    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        policy: RestartPolicy = RestartPolicy(),
    ):
        self.name = name
        self.body = body
        self.on_failure = on_failure
        self.policy = policy
        self.state: State = "idle"
        self.failures = 0
        self.last_error: str | None = None
        self._recent: deque[float] = deque()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.state = "running"
            self._task = asyncio.create_task(self._supervise(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.state != "failed":
            self.state = "stopped"

    async def finished(self) -> None:
        """Wait for the loop to end by itself (`body` returned, or the supervisor gave up); cancelling the wait
        cancels the loop."""
        if self._task is not None:
            await self._task

    @property
    def healthy(self) -> bool:
        return self.state == "running"

    def status(self) -> dict:
        return {"state": self.state, "failures": self.failures, "last_error": self.last_error}

    async def _supervise(self) -> None:
        while True:
            self.state = "running"
            try:
                await self.body()
            except Exception as exc:
                # A driver may turn this task's own cancellation into its own error: then stop, never restart.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                delay = self._failed(exc)
                if delay is None:
                    return
                self.state = "restarting"
                await asyncio.sleep(delay)
                continue
            self.state = "stopped"
            return

    def _failed(self, exc: Exception) -> float | None:
        """Book a failure; the backoff before the restart, or None when the supervisor gives up."""
        now = time.monotonic()
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._recent.append(now)
        while self._recent and self._recent[0] < now - self.policy.window_s:
            self._recent.popleft()
        metrics.BACKGROUND_TASK_FAILURES.labels(self.name).inc()
        limit = self.policy.give_up_after
        giving_up = limit is not None and len(self._recent) >= limit
        log.error(
            "background task %s failed (%d in the last %g s)%s",
            self.name,
            len(self._recent),
            self.policy.window_s,
            "; giving up: the process needs a restart" if giving_up else "; restarting",
            exc_info=exc,
        )
        if giving_up:
            # Before `on_failure`, which may then also fail the work queued for a loop that will not come back.
            self.state = "failed"
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:
                log.exception("cleaning up after the failure of %s failed", self.name)
        if giving_up:
            return None
        return min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (len(self._recent) - 1))

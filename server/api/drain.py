"""Drain on SIGTERM, so that a load balancer takes the replica out of rotation before it stops accepting.

Under uvicorn (bare `uvicorn server.main:app` or `python -m server serve`), SIGTERM does not stop the server at
once: `/health` answers 503 from that moment (`Health.draining`), requests are still accepted and answered for
`DRAIN_S`, and only then is uvicorn's own SIGTERM handling run (it stops accepting and waits for open requests).
Requests still open `SHUTDOWN_TIMEOUT_S` after that are cut: each gets a JSON 503 (its connection closes), not
uvicorn's plain-text 500, so a client trickling a body or waiting on a slow answer cannot hold the exit back. A
second SIGTERM during the drain stops at once.

Only uvicorn's handler is wrapped (found in place when the app starts): other hosts (tests' in-process transport,
`python -m server worker`) keep their own signal handling.
"""

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.services.infra.health import Health

log = logging.getLogger(__name__)
Handler = Callable[[int, FrameType | None], None]


class Drain:
    def __init__(self, health: Health, *, drain_s: float, shutdown_timeout_s: float):
        self.health = health
        self.drain_s = drain_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.requests: set[asyncio.Task] = set()
        self.cut = False

    def install(self) -> bool:
        """Wrap uvicorn's SIGTERM handler, if it is the one in place; whether it was."""
        stop = signal.getsignal(signal.SIGTERM)
        if not callable(stop) or not isinstance(getattr(stop, "__self__", None), uvicorn.Server):
            return False
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self.health.draining:
                stop(signum, frame)
                return
            self.health.draining = True
            # A signal handler runs between two bytecodes of the loop's thread: the loop is told, not called.
            loop.call_soon_threadsafe(self._drain, loop, stop, signum)

        signal.signal(signal.SIGTERM, on_sigterm)
        return True

    def _drain(self, loop: asyncio.AbstractEventLoop, stop: Handler, signum: int) -> None:
        log.warning(
            "SIGTERM: draining for %g s (/health answers 503, requests are still served), then stopping; "
            "requests still open %g s later are cut with 503",
            self.drain_s,
            self.shutdown_timeout_s,
        )
        loop.call_later(self.drain_s, self._stop, loop, stop, signum)

    def _stop(self, loop: asyncio.AbstractEventLoop, stop: Handler, signum: int) -> None:
        stop(signum, None)
        loop.call_later(self.shutdown_timeout_s, self._cut)

    def _cut(self) -> None:
        if self.requests:
            log.warning(
                "cutting %d request(s) still open %g s after the drain (SHUTDOWN_TIMEOUT_S): 503",
                len(self.requests),
                self.shutdown_timeout_s,
            )
        self.cut = True
        for task in self.requests:
            task.cancel()


class DrainMiddleware:
    """Tracks the open requests; one cut by the shutdown deadline is answered 503 (or, if its answer had started,
    ended where it was)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        drain: Drain | None = getattr(scope["app"].state, "drain", None)
        task = asyncio.current_task()
        if scope["type"] != "http" or drain is None or task is None:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        drain.requests.add(task)
        try:
            await self.app(scope, receive, tracking)
        except asyncio.CancelledError:
            if not drain.cut or not task.cancelling():
                raise
            task.uncancel()
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await JSONResponse(
                    {"detail": "the server is shutting down: retry (another replica answers)"},
                    503,
                    {"Connection": "close", "Retry-After": "1"},
                )(scope, receive, send)
        finally:
            drain.requests.discard(task)

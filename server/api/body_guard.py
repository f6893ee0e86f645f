"""Request body limits, enforced while the body streams in, as a pure ASGI middleware (BaseHTTPMiddleware
would break disconnect detection in `cancellation.py`).

A body over MAX_REQUEST_BYTES is refused with 413 before anything parses it: at once when its Content-Length
says so, else as soon as the bytes received pass the limit (a chunked body has no Content-Length). A body whose
next chunk does not arrive within BODY_TIMEOUT_S, or whose last chunk has not arrived BODY_DEADLINE_S after the
request started (a body trickled a byte at a time never waits BODY_TIMEOUT_S for one chunk), is answered 408, so
that a half-sent body cannot hold a handler for ever. These answers close the connection: what is left of the body
is never read. A client that leaves before its body is complete is a 499 (client closed request) in the records and
metrics, not the 400 of a body that does not parse.
"""

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.services.analytics.request_log import CLIENT_CLOSED

_CLOSE = {"Connection": "close"}


class BodyGuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        deadline_s: float,
        path_limits: dict[str, tuple[int, str]] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        # Paths whose bodies are bounded by a setting of their own: path -> (bytes, the setting's name).
        self.path_limits = path_limits or {}
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s

    @staticmethod
    def _too_large(limit: int, setting: str) -> HTTPException:
        return HTTPException(413, f"request body larger than {setting} ({limit} bytes)", _CLOSE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.path_limits.get(scope["path"], (self.max_bytes, "MAX_REQUEST_BYTES"))
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            refusal = self._too_large(limit, setting)
            await JSONResponse({"detail": refusal.detail}, refusal.status_code, refusal.headers)(scope, receive, send)
            return
        received = 0
        complete = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s

        async def guarded_receive() -> Message:
            # Raised from receive(), an HTTPException passes through FastAPI's body parsing (which turns any other
            # error into a 400) to its exception handler: a JSON {"detail": ...}.
            nonlocal received, complete
            if complete:  # past the body, receive() only waits for the disconnect: no deadline
                return await receive()
            chunk_deadline = loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(min(chunk_deadline, deadline)):
                    message = await receive()
            except TimeoutError:
                if deadline <= chunk_deadline:
                    detail = f"request body not complete within BODY_DEADLINE_S ({self.deadline_s:g} s)"
                else:
                    detail = f"request body not received within BODY_TIMEOUT_S ({self.timeout_s:g} s)"
                raise HTTPException(408, detail, _CLOSE) from None
            if message["type"] == "http.disconnect":
                raise HTTPException(CLIENT_CLOSED, "the client left before sending the whole body")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(limit, setting)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)

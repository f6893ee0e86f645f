"""Request ids and access lines, as a pure ASGI middleware (BaseHTTPMiddleware would break disconnect detection).

Each HTTP request gets an id: the client's `X-Request-ID` when it is 1..128 characters of `[A-Za-z0-9._-]`
(a proxy's or caller's id, so that their logs and ours join), else a fresh uuid4 hex. The id is echoed in the
response's `X-Request-ID` header and set in `REQUEST_ID`, which the log formatter adds to every line written
while the request is served. When the request ends, one `server.access` line records its method, route template,
status and duration (uvicorn's own access log is off: it has neither the id nor the route).
"""

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.middleware import route_template
from server.core.logging import REQUEST_ID

HEADER = b"x-request-id"
WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,128}")

access_log = logging.getLogger("server.access")


def request_id_of(scope: Scope) -> str:
    """The client's id when well-formed, else a new one (a malformed id is replaced, never echoed)."""
    for name, value in scope["headers"]:
        if name == HEADER:
            text = value.decode("latin-1")
            if WELL_FORMED.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            self._log_access(scope, status, started)
        # Not reset when the app raised: uvicorn logs the traceback next, in this request's task, and that line
        # should carry the id too (the task, and its context, end right after).
        REQUEST_ID.reset(token)

    @staticmethod
    def _log_access(scope: Scope, status: int, started: float) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        route = route_template(scope)
        access_log.info("%s %s %s %.1f ms", scope["method"], route, status, duration_ms,
                        extra={"method": scope["method"], "route": route, "status": status, "duration_ms": duration_ms})

"""HTTP metrics as a pure ASGI middleware (BaseHTTPMiddleware would break disconnect detection)."""

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core import metrics


def route_template(scope: Scope) -> str:
    """The matched route's path template (set by the router), so that labels stay few."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = route_template(scope)
            metrics.HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)

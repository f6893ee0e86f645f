"""Each HTTP request observed once, as a pure ASGI middleware (BaseHTTPMiddleware would break disconnect
detection): its id, its metrics and its access line.

Each request gets an id: the client's `X-Request-ID` when it is 1..128 characters of `[A-Za-z0-9._-]` (a
proxy's or caller's id, so that their logs and ours join), else a fresh uuid4 hex. The id is echoed in the
response's `X-Request-ID` header and set in `REQUEST_ID`, which the log formatter adds to every line written
while the request is served. When the request ends, its status and duration go to the HTTP metrics and to
one `server.access` line with its method and route template (uvicorn's own access log is off: it has
neither the id nor the route). A /generate or /predict request that failed before its service recorded it
(schema, key, rate limit, body limits) is recorded here, so that error rates count every request.
"""

import logging
import re
import time
import uuid
from collections.abc import Iterable

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.routing import Match, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.ratelimit import bearer_token
from server.core import metrics
from server.core.logging import REQUEST_ID
from server.core.tenants import UNAUTHENTICATED
from server.services.analytics.request_log import REQUEST_MARK, RequestMark

HEADER = b"x-request-id"
WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,128}")

access_log = logging.getLogger("server.access")


def route_template(scope: Scope) -> str:
    """The matched route's path template, so that labels stay few. FastAPI's routes set it in the scope; a plain
    Starlette route (`/openapi.json`) does not, nor does a request answered before routing (a 429 of the rate
    limiter, a 401, a 413): those are matched here, against the app's own routes and then its OpenAPI paths (the
    routes of included routers, which `create_app` lists in `app.state.route_templates`)."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "unmatched")
    app = scope.get("app")
    if app is None:
        return "unmatched"
    for candidate in app.router.routes:
        path = getattr(candidate, "path", None)
        if path is not None and candidate.matches(scope)[0] is not Match.NONE:
            return path
    for template, pattern in getattr(app.state, "route_templates", ()):
        if pattern.fullmatch(scope["path"]):
            return template
    return "unmatched"


def route_templates(routers: Iterable[APIRouter]) -> list[tuple[str, re.Pattern[str]]]:
    """The path templates of included routers' routes, compiled once for `route_template` (FastAPI matches an
    included router as a whole, so its routes are not among the app's own)."""
    return [
        (route.path, compile_path(route.path)[0])
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
    ]


def request_id_of(scope: Scope) -> str:
    """The client's id when well-formed, else a new one (a malformed id is replaced, never echoed)."""
    for name, value in scope["headers"]:
        if name == HEADER:
            text = value.decode("latin-1")
            if WELL_FORMED.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def record_refusal(scope: Scope, started: float, status: int) -> None:
    """Record a model request that its service never saw (by path: a refused request may have matched no route),
    under its caller's tenant: the key's, or UNAUTHENTICATED for a request without a valid one."""
    runtime = getattr(scope["app"].state, "runtime", None)
    if runtime is None or scope["method"] != "POST":
        return
    service = {
        "/generate": runtime.generation,
        "/v1/completions": runtime.generation,
        "/v1/chat/completions": runtime.generation,
        "/predict": runtime.sentiment,
    }.get(scope["path"])
    if service is None:
        return
    principal = runtime.keys.identify(bearer_token(scope))
    if principal is None and runtime.keys.anonymous_allowed:
        principal = runtime.keys.anonymous
    service.requests.refused(started, status, principal.tenant if principal else UNAUTHENTICATED)


class ObservedRequestMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)
        mark = RequestMark()
        REQUEST_MARK.set(mark)
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
            self._observe(scope, status, time.perf_counter() - started)
            if status >= 400 and not mark.recorded:
                record_refusal(scope, started, status)
        # Not reset when the app raised: uvicorn logs the traceback next, in this request's task, and that line
        # should carry the id too (the task, and its context, end right after).
        REQUEST_ID.reset(token)

    @staticmethod
    def _observe(scope: Scope, status: int, duration_s: float) -> None:
        method, route = scope["method"], route_template(scope)
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_LATENCY.labels(method, route).observe(duration_s)
        duration_ms = round(duration_s * 1000, 1)
        access_log.info(
            "%s %s %s %.1f ms",
            method,
            route,
            status,
            duration_ms,
            extra={"method": method, "route": route, "status": status, "duration_ms": duration_ms},
        )

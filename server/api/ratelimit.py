"""Ingress rate limiting as a pure ASGI middleware, so that every limited response (422 and 500 too)
carries the `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers).

The client is its API key when it presents a valid one, else `scope["client"]`: the peer address, or the
X-Forwarded-For hop uvicorn resolved when the peer is listed in FORWARDED_ALLOW_IPS. A header from any
other peer changes nothing.
"""

import json
import math

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.tenants import UNAUTHORIZED
from server.services.limits.decide import LimiterUnavailable

# The dashboard page holds no figures (its script asks the limited JSON routes, with the key).
OPEN_PATHS = frozenset(
    {
        "/",
        "/health",
        "/health/live",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/dashboard",
    }
)
# The docs' assets (and any page served from /static): a page load fetches several, none costs more than a file read.
OPEN_PREFIXES = ("/static/",)
ROUTE_GROUPS = {
    "/generate": "generate",
    "/v1/completions": "generate",
    "/v1/chat/completions": "generate",
    "/predict": "predict",
    "/analyze/performance": "analyze",
}


def bearer_token(scope: Scope) -> str | None:
    """The request's `Authorization: Bearer` token, if it has one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def client_identity(scope: Scope, runtime) -> str:
    if (principal := runtime.keys.identify(bearer_token(scope))) is not None:
        return principal.key_id
    client = scope.get("client")
    return f"ip:{client[0] if client else 'unknown'}"


async def _json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class IngressRateLimitMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        runtime = scope["app"].state.runtime
        if not runtime.keys.anonymous_allowed and runtime.keys.identify(bearer_token(scope)) is None:
            # A request the routes will refuse for its key is answered so here, before it counts: a client that
            # forgot its key keeps getting 401 (the cause), never 429 for tries that could not succeed.
            await _json(send, 401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
            return
        try:
            decision = await runtime.ingress.check(
                ROUTE_GROUPS.get(scope["path"], "default"), client_identity(scope, runtime)
            )
        except LimiterUnavailable as exc:
            await _json(send, 503, {"detail": str(exc)}, [(b"retry-after", b"1")])
            return
        if decision is None:
            await self.app(scope, receive, send)
            return
        headers = [
            (b"ratelimit-policy", ", ".join(s.policy.header for s in decision.states).encode()),
            (b"ratelimit", ", ".join(s.header for s in decision.states).encode()),
        ]
        if not decision.allowed:
            retry_after = max(1, math.ceil(decision.retry_after_s))
            names = ", ".join(decision.denied_by)
            await _json(
                send,
                429,
                {"detail": f"rate limit exceeded (policy {names}); retry after {retry_after} s", "policy": names},
                [(b"retry-after", str(retry_after).encode()), *headers],
            )
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, with_headers)

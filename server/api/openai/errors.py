"""Errors under /v1 in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

A pure ASGI middleware rewrites the JSON errors of every layer (API keys, rate limits, body limits, validation,
the services' 503/504/500) for /v1 paths, so those routes share every check of the others and still answer as
OpenAI does: its SDK then raises the matching exception (`BadRequestError`, `RateLimitError`, ...). Validation
errors are 400 there (OpenAI's status), not FastAPI's 422."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/v1/"
_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "insufficient_permissions"),
    404: ("invalid_request_error", "not_found"),
    408: ("invalid_request_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind, default_code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def _translate(status: int, body: dict) -> tuple[int, dict]:
    if "error" in body:
        return status, body
    detail = body.get("detail", "error")
    if isinstance(detail, list):

        def where(error: dict) -> str:
            return ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"

        message = "; ".join(f"{where(e)}: {e.get('msg', '')}" for e in detail if isinstance(e, dict))
        param = where(detail[0]) if detail and isinstance(detail[0], dict) else None
        return 400, error_body(400, message or "invalid request", param)
    return status, error_body(status, str(detail))


class OpenAIErrorMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def rewriting(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and content_type.startswith(b"application/json"):
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                try:
                    status, translated = _translate(start["status"], json.loads(body))
                except ValueError:
                    status, translated = start["status"], error_body(start["status"], body.decode(errors="replace"))
                payload = json.dumps(translated).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                await send(
                    {**start, "status": status, "headers": [*headers, (b"content-length", str(len(payload)).encode())]}
                )
                await send({"type": "http.response.body", "body": payload})
                return
            await send(message)

        await self.app(scope, receive, rewriting)

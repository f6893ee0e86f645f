"""Service errors to HTTP answers, always JSON with a `detail` (FastAPI's own 422 shape for input errors)."""

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.api.cancellation import ClientClosed
from server.core.logging import REQUEST_ID
from server.services.analytics.request_log import CLIENT_CLOSED
from server.services.errors import BlockedPrompt, DeadlineExceeded, InputError, ModelFailed, NotGranted, Overloaded
from server.services.offload.jobs import JobConflict, JobNotFound

logger = logging.getLogger(__name__)

EXCERPT_CHARS = 100
_EXCERPT_ITEMS = 8
_EXCERPT_DEPTH = 2
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}  # NaN is the default: it equals nothing


def _clip(text: str) -> str:
    """Lone surrogates written as `\\udXXX` escapes, then at most EXCERPT_CHARS characters (and an ellipsis)."""
    escaped = text[:EXCERPT_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped[:EXCERPT_CHARS] + "…" if len(text) > EXCERPT_CHARS or len(escaped) > EXCERPT_CHARS else escaped


def _summary(value: list | tuple | dict) -> str:
    noun = ("key", "keys") if isinstance(value, dict) else ("item", "items")
    return f"<{'object' if isinstance(value, dict) else 'array'} with {len(value)} {noun[len(value) != 1]}>"


def excerpt(value: Any, depth: int = 0) -> Any:
    """A short stand-in for a request value echoed in an error, that `json.dumps(allow_nan=False)` always
    encodes: strings clipped to EXCERPT_CHARS with lone surrogates escaped, bytes decoded the same way, NaN and
    infinities as the strings `NaN`, `Infinity`, `-Infinity`, and containers shown only when small and shallow
    (else as `<array with N items>`), so neither the size nor the nesting of the input reaches the answer."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return value if math.isfinite(value) else _NON_FINITE.get(value, "NaN")
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, bytes | bytearray):
        head = bytes(value[:EXCERPT_CHARS]).decode("utf-8", "backslashreplace")
        return head[:EXCERPT_CHARS] + "…" if len(value) > EXCERPT_CHARS or len(head) > EXCERPT_CHARS else head
    if isinstance(value, list | tuple | dict):
        if depth >= _EXCERPT_DEPTH or len(value) > _EXCERPT_ITEMS:
            return _summary(value)
        shown = (
            {_clip(str(k)): excerpt(v, depth + 1) for k, v in value.items()}
            if isinstance(value, dict)
            else [excerpt(v, depth + 1) for v in value]
        )
        return shown if len(json.dumps(shown)) <= EXCERPT_CHARS else _summary(value)
    return f"<{type(value).__name__}>"


def _safe_error(error: dict) -> dict:
    """One entry of FastAPI's 422 list, every part of it safe to encode and short."""
    safe: dict[str, Any] = {
        "type": _clip(str(error.get("type", "value_error"))),
        "loc": [part if isinstance(part, int) else _clip(str(part)) for part in error.get("loc", ())],
        "msg": str(error.get("msg", "")).encode("utf-8", "backslashreplace").decode("utf-8"),
    }
    if "input" in error:
        safe["input"] = excerpt(error["input"])
    ctx = {
        key: _clip(str(value)) if isinstance(value, BaseException) else excerpt(value)
        for key, value in (error.get("ctx") or {}).items()
        if isinstance(value, BaseException | str | int | float | None)
    }
    if ctx:
        safe["ctx"] = ctx
    if safe["type"] == "json_invalid" and "error" in ctx:
        # FastAPI says only "JSON decode error"; the reason (bad UTF-8, nesting, where) is what the client needs.
        safe["msg"] = f"{safe['msg']}: {ctx['error']}"
    return safe


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (a list of {type, loc, msg, input, ctx}), but echoing only excerpts of the input: its own
    handler serialises the input whole, so a 4 MB body got a 4 MB answer, and NaN or a lone surrogate a 500."""
    try:
        detail = [_safe_error(error) for error in exc.errors()]
        if "json" not in request.headers.get("content-type", ""):
            for error in detail:
                if error["loc"] == ["body"] and error["type"] == "model_attributes_type":
                    error["msg"] += " (the body was not read as JSON: send the header 'content-type: application/json')"
        return JSONResponse({"detail": detail}, status_code=422)
    except Exception:  # the answer to bad input must never itself fail
        logger.exception("could not describe a request validation error")
        return JSONResponse(
            {"detail": [{"type": "value_error", "loc": ["body"], "msg": "invalid request"}]}, status_code=422
        )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette answers this outside the middleware stack, so the request-id middleware cannot add its header.
    request_id = REQUEST_ID.get()
    return JSONResponse(
        {"detail": "internal server error"},
        status_code=500,
        headers={"X-Request-ID": request_id} if request_id else None,
    )


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    detail = [{"type": "value_error", "loc": list(e.loc), "msg": e.msg} for e in exc.errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _not_granted(request: Request, exc: NotGranted) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=403)


async def _conflict(request: Request, exc: JobConflict) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _blocked(request: Request, exc: BlockedPrompt) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "index": exc.index}, status_code=400)


async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(math.ceil(exc.retry_after_s))}
    )


async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=504)


async def _model_failed(request: Request, exc: ModelFailed) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=500)


async def _client_closed(request: Request, exc: ClientClosed) -> JSONResponse:
    # Nobody reads it: the status is for the metrics, the access log and the records.
    return JSONResponse({"detail": str(exc)}, status_code=CLIENT_CLOSED)


def install(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception; each of these takes the class it is registered for.
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # Any other exception still gets logged with its traceback; the client gets JSON like every other error.
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(InputError, _input_error)  # type: ignore[arg-type]
    app.add_exception_handler(BlockedPrompt, _blocked)  # type: ignore[arg-type]
    app.add_exception_handler(JobNotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(JobConflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(NotGranted, _not_granted)  # type: ignore[arg-type]
    app.add_exception_handler(Overloaded, _overloaded)  # type: ignore[arg-type]
    app.add_exception_handler(DeadlineExceeded, _deadline)  # type: ignore[arg-type]
    app.add_exception_handler(ModelFailed, _model_failed)  # type: ignore[arg-type]
    app.add_exception_handler(ClientClosed, _client_closed)  # type: ignore[arg-type]

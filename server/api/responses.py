"""The error answers of the routes, declared once for `/openapi.json` (docs/api.md's "Errors" table).

422 is not here: FastAPI declares it on every route that validates input, with the shape `errors.py` keeps.
"""

from typing import Any

from pydantic import BaseModel

from server.api.schemas import BlockedPromptOut, ErrorOut, RateLimitedOut

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}

ERRORS: dict[int, tuple[type[BaseModel], str, dict[str, Any]]] = {
    400: (BlockedPromptOut, "A prompt contains a term of BLOCKED_TERMS (before any model work)", {}),
    401: (
        ErrorOut,
        "API keys are configured and the request has none, or a wrong one",
        {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    ),
    408: (ErrorOut, "The request body did not arrive within BODY_TIMEOUT_S", {}),
    413: (ErrorOut, "The request body is larger than MAX_REQUEST_BYTES (refused before parsing)", {}),
    429: (
        RateLimitedOut,
        "The client's rate limit is used up",
        {
            **_RETRY_AFTER,
            "RateLimit-Policy": {"description": "Quota and window of each policy", "schema": {"type": "string"}},
            "RateLimit": {"description": "Remaining quota and seconds to full reset", "schema": {"type": "string"}},
        },
    ),
    500: (
        ErrorOut,
        (
            "The model raised on this input (the other requests of its batch are answered), or an "
            "unexpected server error"
        ),
        {},
    ),
    503: (
        ErrorOut,
        (
            "The model's queue cannot take all of the request's items (SCHEDULER_QUEUE_LIMIT), or the rate "
            "limiter's Redis is down with RATE_LIMIT_FAIL_MODE=closed"
        ),
        _RETRY_AFTER,
    ),
    504: (ErrorOut, "Not finished within REQUEST_TIMEOUT_S", {}),
}

# Every route behind the API key check and the rate limiter.
LIMITED_ROUTE_ERRORS = (401, 429, 500, 503)
# Routes that take a JSON body and run a model.
MODEL_ROUTE_ERRORS = (*LIMITED_ROUTE_ERRORS, 408, 413, 504)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these statuses."""
    declared: dict[int | str, dict[str, Any]] = {}
    for status in sorted(statuses):
        model, description, headers = ERRORS[status]
        declared[status] = {"model": model, "description": description, **({"headers": headers} if headers else {})}
    return declared

"""SDK exceptions as `ProviderError`: the HTTP status and the server's Retry-After, the same for every SDK."""

import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import aiohttp
import anthropic
import httpx
import openai
from google.genai import errors as genai_errors

from server.providers.base import ProviderError

T = TypeVar("T")


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date (RFC 9110)."""
    value = (headers or {}).get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def translate(provider: str, operation: str, exc: Exception) -> ProviderError:
    if isinstance(exc, (openai.APIStatusError, anthropic.APIStatusError)):
        return ProviderError(
            provider,
            operation,
            f"HTTP {exc.status_code}: {exc.message}",
            status=exc.status_code,
            retry_after_s=retry_after_s(exc.response.headers),
        )
    if isinstance(exc, genai_errors.APIError):
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return ProviderError(
            provider,
            operation,
            f"HTTP {exc.code}: {exc.message}",
            status=exc.code,
            retry_after_s=retry_after_s(headers),
        )
    return ProviderError(provider, operation, f"{type(exc).__name__}: {exc}")


# No answer, or none that can be read: the call may or may not have taken effect. google-genai lets its transport's
# own errors through (aiohttp's when installed, else httpx's).
ANSWERLESS = (
    openai.APIConnectionError,
    anthropic.APIConnectionError,
    httpx.TransportError,
    aiohttp.ClientError,
    TimeoutError,
    OSError,
)


async def guarded(provider: str, operation: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run one SDK call; its errors (HTTP or no answer) come out as `ProviderError`."""
    try:
        return await call()
    except (openai.APIStatusError, anthropic.APIStatusError, genai_errors.APIError, *ANSWERLESS) as exc:
        raise translate(provider, operation, exc) from exc

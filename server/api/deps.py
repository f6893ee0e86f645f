"""Annotated dependencies: routes declare what they need, the lifespan's `Runtime` provides it.

All are `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per
dependency per request that costs more than a cache hit's own work.
"""

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.services.generation import GenerationService
from server.services.runtime import Runtime
from server.services.sentiment import SentimentService


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_generation(runtime: RuntimeDep) -> GenerationService:
    return runtime.generation


async def get_sentiment(runtime: RuntimeDep) -> SentimentService:
    return runtime.sentiment


GenerationDep = Annotated[GenerationService, Depends(get_generation)]
SentimentDep = Annotated[SentimentService, Depends(get_sentiment)]


async def cache_bypass(runtime: RuntimeDep, cache_control: Annotated[str | None, Header()] = None) -> bool:
    """`Cache-Control: no-cache` recomputes (and refreshes the entry), only when CACHE_ALLOW_CLIENT_BYPASS is on."""
    asked = cache_control is not None and "no-cache" in cache_control.lower()
    return asked and runtime.settings.cache_allow_client_bypass


CacheBypassDep = Annotated[bool, Depends(cache_bypass)]


async def respond_async(prefer: Annotated[str | None, Header(description="`respond-async`: answer 202 at once and "
                                                                       "run the work as a local batch item")] = None
                        ) -> bool:
    """Whether the client prefers an asynchronous answer (RFC 7240 `Prefer: respond-async`)."""
    return prefer is not None and any(token.split(";")[0].strip().lower() == "respond-async"
                                      for token in prefer.split(","))


RespondAsyncDep = Annotated[bool, Depends(respond_async)]


def accepted(queued: list) -> JSONResponse:
    """202 for deferred work: where to follow each item (`Location`: the first)."""
    body = [{"item_id": q.item_id, "job_id": q.job_id, "url": f"/batch/items/{q.item_id}"} for q in queued]
    return JSONResponse(body, status_code=202, headers={"Location": body[0]["url"],
                                                          "Preference-Applied": "respond-async"})


def x_cache(cached: list[bool]) -> str:
    """The `X-Cache` header: HIT when every item came from the cache, MISS when none did, else PARTIAL."""
    return "HIT" if all(cached) else "MISS" if not any(cached) else "PARTIAL"


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def _unauthorized() -> HTTPException:
    return HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": "Bearer"})


def check_api_key(runtime: Runtime, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 with `WWW-Authenticate: Bearer` unless API_KEYS is empty or the bearer token is one of them (or one of
    ADMIN_API_KEYS: an admin may do what anyone may)."""
    token = credentials.credentials if credentials else None
    if (runtime.api_keys.enabled and runtime.api_keys.identify(token) is None
            and runtime.admin_keys.identify(token) is None):
        raise _unauthorized()


async def require_api_key(runtime: RuntimeDep, credentials: BearerDep) -> None:
    check_api_key(runtime, credentials)


async def require_admin(runtime: RuntimeDep, credentials: BearerDep) -> str | None:
    """For operations that change the server for everyone. With ADMIN_API_KEYS set: an admin key, else 403 for an
    ordinary key and 401 for none; without it, whatever `check_api_key` lets through. Returns the caller's key id
    (never the key) for the audit trail, None on an open server."""
    token = credentials.credentials if credentials else None
    if runtime.admin_keys.enabled:
        admin = runtime.admin_keys.identify(token)
        if admin is not None:
            return admin
        if runtime.api_keys.identify(token) is not None:
            raise HTTPException(403, "this operation needs an admin key (ADMIN_API_KEYS)")
        raise _unauthorized()
    check_api_key(runtime, credentials)
    return runtime.api_keys.identify(token)


AdminDep = Annotated[str | None, Depends(require_admin)]

"""Annotated dependencies: routes declare what they need, the lifespan's `Runtime` provides it.

All are `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop per
dependency per request that costs more than a cache hit's own work.
"""

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.core.tenants import UNAUTHORIZED, Principal
from server.runtime import Runtime
from server.services.offload.openai_batches import OpenAIBatches
from server.services.offload.service import BatchOffload
from server.services.serving.generation import GenerationService
from server.services.serving.sentiment import SentimentService


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_generation(runtime: RuntimeDep) -> GenerationService:
    return runtime.generation


async def get_sentiment(runtime: RuntimeDep) -> SentimentService:
    return runtime.sentiment


async def get_offload(runtime: RuntimeDep) -> BatchOffload:
    return runtime.batch


async def get_openai_batches(runtime: RuntimeDep) -> OpenAIBatches:
    return runtime.openai_batches


GenerationDep = Annotated[GenerationService, Depends(get_generation)]
OffloadDep = Annotated[BatchOffload, Depends(get_offload)]
OpenAIBatchesDep = Annotated[OpenAIBatches, Depends(get_openai_batches)]
SentimentDep = Annotated[SentimentService, Depends(get_sentiment)]


async def cache_bypass(runtime: RuntimeDep, cache_control: Annotated[str | None, Header()] = None) -> bool:
    """`Cache-Control: no-cache` recomputes (and refreshes the entry), only when CACHE_ALLOW_CLIENT_BYPASS is on."""
    asked = cache_control is not None and "no-cache" in cache_control.lower()
    return asked and runtime.settings.cache_allow_client_bypass


CacheBypassDep = Annotated[bool, Depends(cache_bypass)]


async def respond_async(
    prefer: Annotated[
        str | None, Header(description="`respond-async`: answer 202 at once and run the work as a local batch item")
    ] = None,
) -> bool:
    """Whether the client prefers an asynchronous answer (RFC 7240 `Prefer: respond-async`)."""
    return prefer is not None and any(
        token.split(";")[0].strip().lower() == "respond-async" for token in prefer.split(",")
    )


RespondAsyncDep = Annotated[bool, Depends(respond_async)]


def accepted(queued: list) -> JSONResponse:
    """202 for deferred work: where to follow each item (`Location`: the first)."""
    body = [{"item_id": q.item_id, "job_id": q.job_id, "url": f"/batch/items/{q.item_id}"} for q in queued]
    return JSONResponse(
        body, status_code=202, headers={"Location": body[0]["url"], "Preference-Applied": "respond-async"}
    )


def x_cache(cached: list[bool]) -> str:
    """The `X-Cache` header: HIT when every item came from the cache, MISS when none did, else PARTIAL."""
    return "HIT" if all(cached) else "MISS" if not any(cached) else "PARTIAL"


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def _unauthorized() -> HTTPException:
    return HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def identify(runtime: Runtime, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller: the tenant and role of its key; where no key is needed (an open server, or only admin keys
    configured), a caller without a valid key is the anonymous principal. 401 with `WWW-Authenticate: Bearer`
    otherwise."""
    principal = runtime.keys.identify(credentials.credentials if credentials else None)
    if principal is not None:
        return principal
    if runtime.keys.anonymous_allowed:
        return runtime.keys.anonymous
    raise _unauthorized()


async def authenticate(request: Request, runtime: RuntimeDep, credentials: BearerDep) -> Principal:
    """The router-level check of every route that serves or stores data; the HTTP layer reads the principal back
    from `request.state` (to record a refused request under its tenant)."""
    principal = identify(runtime, credentials)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def require_admin(principal: PrincipalDep) -> Principal:
    """For operations that change the server for everyone or reach every tenant: 403 for an ordinary key."""
    if not principal.admin:
        raise HTTPException(
            403, 'this operation needs an admin key (ADMIN_API_KEYS, or role = "admin" in API_KEYS_FILE)'
        )
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
TenantQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=64,
        description=(
            "Admin keys only: the data of this tenant alone (by default an admin sees every tenant's); another key "
            "gets 403 for any tenant but its own"
        ),
    ),
]


async def read_scope(principal: PrincipalDep, tenant: TenantQuery = None) -> str | None:
    """The tenant whose data a read covers: the caller's own, or for an admin the one asked for (None: all)."""
    try:
        return principal.scope(tenant)
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from None


ScopeDep = Annotated[str | None, Depends(read_scope)]

"""Serving analytics over every replica (from the database), the performance report, cache administration."""

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from server.api.analytics.schemas import (
    AggregatedIn,
    AggregatedOut,
    AnalyzeIn,
    CacheOut,
    CacheRemovedOut,
    CountOut,
    ReportOut,
    ThresholdsOut,
)
from server.api.deps import AdminDep, PrincipalDep, RuntimeDep, ScopeDep
from server.api.json_body import JSONBodyRoute
from server.api.responses import LIMITED_ROUTE_ERRORS, error_responses
from server.api.schemas import ErrorOut
from server.runtime import Runtime
from server.services.analytics.thresholds import Thresholds
from server.services.cache import ResponseCache

log = logging.getLogger(__name__)
router = APIRouter(tags=["analytics"], route_class=JSONBodyRoute)
ADMIN_ERRORS = {
    403: {"model": ErrorOut, "description": "ADMIN_API_KEYS is set and the key is not one of them"},
    **error_responses(*LIMITED_ROUTE_ERRORS),
}


@router.get("/metrics/count", response_model=CountOut, responses=error_responses(*LIMITED_ROUTE_ERRORS))
async def count(
    runtime: RuntimeDep,
    scope: ScopeDep,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
) -> CountOut:
    """Items answered (predictions, generations) for the tenant by every replica, at one-minute resolution."""
    counted = await runtime.analytics.count(
        since=since, until=until, model=model and runtime.model_name(model), tenant=scope
    )
    predictions, generations = counted.get("predict", 0), counted.get("generate", 0)
    return CountOut(predictions=predictions, generations=generations, total=predictions + generations)


@router.post("/metrics/aggregated", response_model=AggregatedOut, responses=error_responses(*LIMITED_ROUTE_ERRORS))
async def aggregated(
    body: AggregatedIn, runtime: RuntimeDep, scope: ScopeDep, principal: PrincipalDep
) -> AggregatedOut:
    """The tenant's requests, items, errors, cache hit ratio, latency percentiles (from per-minute histograms),
    tokens and throughput per bucket and over the window, plus the thresholds the window breaches; and, for admin
    keys, whatever the window, this process's queues, batch sizes and rate-limit decisions over every tenant
    (`live`, null for other keys)."""
    result, found = await runtime.analytics.aggregated(
        body.start, body.end, body.bucket, endpoint=body.endpoint, model=body.model, tenant=scope
    )
    return AggregatedOut(
        buckets=[bucket.summary() for bucket in result.buckets],
        total=result.total.summary(),
        breaches=[b.as_dict() for b in found],
        live=runtime.analytics.live() if principal.admin else None,
    )


@router.get("/metrics/thresholds", response_model=ThresholdsOut, responses=error_responses(*LIMITED_ROUTE_ERRORS))
async def get_thresholds(runtime: RuntimeDep) -> ThresholdsOut:
    """The thresholds that define "doing badly" (shared by every replica)."""
    return ThresholdsOut(**(await runtime.analytics.thresholds()).model_dump())


@router.put("/metrics/thresholds", response_model=ThresholdsOut, responses=ADMIN_ERRORS)
async def put_thresholds(body: Thresholds, runtime: RuntimeDep, admin: AdminDep) -> ThresholdsOut:
    """Replace the thresholds (fields left out take their defaults; null turns one off). Audited: the key's id,
    the changes and the time are stored."""
    changes = await runtime.analytics.set_thresholds(body, admin.key_id, admin.tenant)
    log.info("thresholds changed by %s: %s", admin.key_id or "an anonymous caller", changes)
    return ThresholdsOut(**body.model_dump(), updated=sorted(changes))


@router.post("/analyze/performance", response_model=ReportOut, responses=error_responses(*LIMITED_ROUTE_ERRORS))
async def analyze(
    runtime: RuntimeDep, scope: ScopeDep, principal: PrincipalDep, body: AnalyzeIn | None = None
) -> ReportOut:
    """A performance report on the tenant's requests in the window: Gemini's (`source: gemini`) or, without a key,
    when Gemini fails or its quota is used up, a rule-based one (`source: fallback` with the reason). Cached for
    GEMINI_CACHE_TTL_S (per tenant)."""
    body = body or AnalyzeIn()
    return ReportOut(
        **await runtime.analytics.analyze(body.start, body.end, body.focus, tenant=scope, caller=principal.tenant)
    )


def _caches(runtime: Runtime) -> list[ResponseCache]:
    """The stores of cached answers: on Redis the reports share the answers' store (one keyspace)."""
    report_cache = runtime.reports.cache
    return [runtime.cache, *([report_cache] if report_cache.backend == "memory" else [])]


CacheEndpoint = Literal["generate", "predict", "analyze"]


@router.get("/cache", response_model=CacheOut, responses=error_responses(*LIMITED_ROUTE_ERRORS))
async def cache_stats(
    runtime: RuntimeDep,
    scope: ScopeDep,
    endpoint: CacheEndpoint | None = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
) -> CacheOut:
    """How many answers the tenant has cached (optionally of one endpoint and model; with CACHE_SCOPE=global, every
    shared answer) and this process's hit ratio."""
    entries = sum(
        [await cache.entries(endpoint, model and runtime.model_name(model), scope) for cache in _caches(runtime)]
    )
    return CacheOut(entries=entries, backend=runtime.cache.backend, hit_ratio=runtime.cache.hit_ratio)


@router.delete("/cache", response_model=CacheRemovedOut, responses=ADMIN_ERRORS)
async def clear_cache(
    runtime: RuntimeDep,
    admin: AdminDep,
    scope: ScopeDep,
    endpoint: CacheEndpoint | None = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
) -> CacheRemovedOut:
    """Remove cached answers (optionally only one endpoint's, one model's, one tenant's); on Redis by SCAN + UNLINK
    in batches. Admin keys only."""
    removed = sum(
        [await cache.remove(endpoint, model and runtime.model_name(model), scope) for cache in _caches(runtime)]
    )
    log.info(
        "cache cleared by %s (endpoint %s, model %s, tenant %s): %d entries removed",
        admin.key_id or "an anonymous caller",
        endpoint or "any",
        model or "any",
        scope or "any",
        removed,
    )
    return CacheRemovedOut(removed=removed)

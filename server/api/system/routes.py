"""Endpoints for operators and load balancers: app info, health, metrics."""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.deps import BearerDep, RuntimeDep, identify
from server.api.system.schemas import AppInfo, CheckOut, HealthOut
from server.ml.device import memory
from server.runtime import describe_models
from server.services.infra.health import Report

router = APIRouter(tags=["system"])


def _models(runtime: RuntimeDep) -> dict[str, dict]:
    return describe_models(runtime.generator, runtime.classifier)


def _devices(runtime: RuntimeDep) -> dict[str, dict]:
    """Each device a model runs on, with its memory in use and free now."""
    return {str(device): memory(device) for device in {runtime.generator.device, runtime.classifier.device}}


def _cache(runtime: RuntimeDep) -> dict:
    return {"backend": runtime.cache.backend, "ttl_s": runtime.settings.cache_ttl_s}


@router.get("/", response_model=AppInfo)
async def info(runtime: RuntimeDep) -> AppInfo:
    return AppInfo(
        name=runtime.settings.app_name,
        version=__version__,
        models=_models(runtime),
        cache=_cache(runtime),
        devices=_devices(runtime),
    )


def _answer(report: Report, runtime: RuntimeDep, credentials: HTTPAuthorizationCredentials | None) -> JSONResponse:
    """The report; where keys are configured, its details (driver errors, counts, addresses) only for a caller with
    a valid key: probes need no key, and an anonymous one learns each check's state, nothing more."""
    shown = not runtime.keys.entries or runtime.keys.identify(credentials.credentials if credentials else None)
    body = HealthOut(
        status=report.status,
        checks={
            name: CheckOut(status=check.status, latency_ms=check.latency_ms, detail=check.detail if shown else {})
            for name, check in report.checks.items()
        },
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=report.http_status)


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(runtime: RuntimeDep, credentials: BearerDep) -> JSONResponse:
    """Readiness, what load balancers probe: 503 when a model's loop is down or stalled, the database does not
    answer, or the server is draining after SIGTERM; Redis failing, records piling up, or a
    batch loop of this process down or restarting (the `batch` check) is only `degraded`."""
    return _answer(await runtime.health.readiness(), runtime, credentials)


@router.get("/health/live", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def liveness(runtime: RuntimeDep, credentials: BearerDep) -> JSONResponse:
    """Liveness, what orchestrators probe: 503 only when the process should be restarted (a model's loop failed
    too often to be restarted)."""
    return _answer(await runtime.health.liveness(), runtime, credentials)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(runtime: RuntimeDep, credentials: BearerDep) -> Response:
    """Prometheus text; open unless METRICS_REQUIRE_KEY is on."""
    if runtime.settings.metrics_require_key:
        identify(runtime, credentials)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

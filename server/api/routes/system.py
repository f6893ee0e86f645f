"""Endpoints for operators and load balancers: app info, health, metrics."""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.deps import BearerDep, RuntimeDep, identify
from server.api.schemas import AppInfo, CheckOut, HealthOut
from server.ml.device import memory
from server.services.health import database_check, records_check, redis_check

router = APIRouter(tags=["system"])


def _models(runtime: RuntimeDep) -> dict[str, dict]:
    return {role: {"name": model.name, "revision": model.revision, "precision": model.precision,
                   "kernels": model.kernels, "device": str(model.device), "dtype": model.placement.dtype_name,
                   "offline_stand_in": model.standin}
            for role, model in (("generator", runtime.generator), ("sentiment", runtime.classifier))}


def _devices(runtime: RuntimeDep) -> dict[str, dict]:
    """Each device a model runs on, with its memory in use and free now."""
    return {str(device): memory(device) for device in {runtime.generator.device, runtime.classifier.device}}


def _cache(runtime: RuntimeDep) -> dict:
    return {"backend": runtime.cache.backend, "ttl_s": runtime.settings.cache_ttl_s}


@router.get("/", response_model=AppInfo)
async def info(runtime: RuntimeDep) -> AppInfo:
    return AppInfo(name=runtime.settings.app_name, version=__version__, models=_models(runtime), cache=_cache(runtime),
                   devices=_devices(runtime))


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(runtime: RuntimeDep) -> JSONResponse:
    """200 when the models are loaded and the database answers, else 503; Redis failing, or records piling up
    (the `records` check), is only `degraded`."""
    checks = {"models": CheckOut(status="ok", latency_ms=0.0, detail=_models(runtime)),
              "devices": CheckOut(status="ok", latency_ms=0.0, detail=_devices(runtime)),
              "database": CheckOut(**(await database_check(runtime.engine)).__dict__),
              "records": CheckOut(**records_check(runtime.recorder).__dict__)}
    if runtime.redis is not None:
        checks["redis"] = CheckOut(**(await redis_check(runtime.redis)).__dict__)
    states = {check.status for check in checks.values()}
    status = "down" if "down" in states else "degraded" if "degraded" in states else "ok"
    body = HealthOut(status=status, checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if status == "down" else 200)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(runtime: RuntimeDep, credentials: BearerDep) -> Response:
    """Prometheus text; open unless METRICS_REQUIRE_KEY is on."""
    if runtime.settings.metrics_require_key:
        identify(runtime, credentials)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

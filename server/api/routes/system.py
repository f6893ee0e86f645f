"""Endpoints for operators and load balancers: app info, health, metrics."""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.deps import RuntimeDep
from server.api.schemas import AppInfo, CheckOut, HealthOut
from server.services.health import database_check

router = APIRouter(tags=["system"])


def _models(runtime: RuntimeDep) -> dict[str, dict]:
    return {role: {"name": model.name, "revision": model.revision, "offline_stand_in": model.standin}
            for role, model in (("generator", runtime.generator), ("sentiment", runtime.classifier))}


@router.get("/", response_model=AppInfo)
async def info(runtime: RuntimeDep) -> AppInfo:
    return AppInfo(name=runtime.settings.app_name, version=__version__, models=_models(runtime))


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(runtime: RuntimeDep) -> JSONResponse:
    """200 when the models are loaded and the database answers; 503 otherwise. Each check is listed."""
    models = CheckOut(status="ok", latency_ms=0.0, detail=_models(runtime))
    database = await database_check(runtime.engine)
    checks = {"models": models, "database": CheckOut(**database.__dict__)}
    status = "ok" if all(check.status == "ok" for check in checks.values()) else "down"
    body = HealthOut(status=status, checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if status == "ok" else 503)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

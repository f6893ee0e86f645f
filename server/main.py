"""The ASGI app: `uvicorn server.main:app` (or `python -m server serve`)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server import __version__
from server.api import errors
from server.api.analytics import dashboard
from server.api.analytics import routes as analytics
from server.api.body_guard import BodyGuardMiddleware
from server.api.deps import authenticate
from server.api.drain import Drain, DrainMiddleware
from server.api.middleware import ObservedRequestMiddleware, route_templates
from server.api.offload import routes as offload
from server.api.openai import batches as openai_batches
from server.api.openai import files as openai_files
from server.api.openai import routes as openai_routes
from server.api.openai.errors import OpenAIErrorMiddleware
from server.api.ratelimit import IngressRateLimitMiddleware
from server.api.serving import generate, history, predict
from server.api.system import docs, static
from server.api.system import routes as system
from server.core.config import Settings, get_settings
from server.core.logging import configure as configure_logging
from server.runtime import open_runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings) as runtime:
            app.state.runtime = runtime
            app.state.drain = Drain(
                runtime.health, drain_s=settings.drain_s, shutdown_timeout_s=settings.shutdown_timeout_s
            )
            app.state.drain.install()
            yield

    app = FastAPI(
        title="Inference server",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="GPT-2 generation and sentiment classification, micro-batched and cached.",
    )
    # The last added runs first. The rate limiter reads no body, so it decides before the body guard: an oversized
    # or stalled body still counts against its client's quota and its 413/408 carries the RateLimit headers.
    app.add_middleware(
        BodyGuardMiddleware,
        max_bytes=settings.max_request_bytes,
        timeout_s=settings.body_timeout_s,
        deadline_s=settings.body_deadline_s,
        path_limits={"/v1/files": (settings.max_batch_file_bytes, "MAX_BATCH_FILE_BYTES")},
    )
    app.add_middleware(IngressRateLimitMiddleware)
    # Inside the OpenAI error shaping and the observation: a request cut at shutdown is an ordinary 503 to both.
    app.add_middleware(DrainMiddleware)
    app.add_middleware(OpenAIErrorMiddleware)
    app.add_middleware(ObservedRequestMiddleware)
    errors.install(app)
    routers = [system.router, docs.router, static.router, dashboard.router]
    for router in routers:
        app.include_router(router)
    keyed = [
        module.router
        for module in (generate, predict, history, offload, analytics, openai_routes, openai_files, openai_batches)
    ]
    for router in keyed:
        app.include_router(router, dependencies=[Depends(authenticate)])
    app.state.route_templates = route_templates(routers + keyed)
    return app


configure_logging(get_settings().log_level, get_settings().log_format)
app = create_app()

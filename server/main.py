"""The ASGI app: `uvicorn server.main:app` (or `python -m server serve`)."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server import __version__
from server.api import errors
from server.api.deps import require_api_key
from server.api.middleware import MetricsMiddleware
from server.api.ratelimit import IngressRateLimitMiddleware
from server.api.routes import batch, generate, history, predict, system
from server.core.config import Settings, get_settings
from server.services.runtime import open_runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings) as runtime:
            app.state.runtime = runtime
            yield

    app = FastAPI(title="Inference server", version=__version__, lifespan=lifespan,
                  description="GPT-2 generation and sentiment classification, micro-batched and cached.")
    app.add_middleware(IngressRateLimitMiddleware)
    app.add_middleware(MetricsMiddleware)
    errors.install(app)
    app.include_router(system.router)
    for module in (generate, predict, history, batch):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    return app


logging.basicConfig(level=get_settings().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()

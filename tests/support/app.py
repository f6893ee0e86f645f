from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from server.core.config import Settings
from server.main import create_app


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, over an in-process transport; `client.app` is the app."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            client.app = app
            yield client

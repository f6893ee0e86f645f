import asyncio

import httpx
import pytest
import uvicorn

from server.core.config import Settings
from server.main import create_app
from tests.support.servers import free_port


@pytest.fixture
async def client(settings: Settings, database_url: str):
    """The app on SQLite and on PostgreSQL, with the batch worker off (tests run its ticks themselves)."""
    app = create_app(settings.model_copy(update={"database_url": database_url, "batch_worker": "off"}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            client.app = app
            yield client


@pytest.fixture
async def live_app(settings: Settings):
    """The app served by uvicorn on 127.0.0.1 (real HTTP: streaming, disconnects); yields (base_url, app)."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await serving

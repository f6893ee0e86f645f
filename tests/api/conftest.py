import httpx
import pytest

from server.core.config import Settings
from server.main import create_app


@pytest.fixture
async def client(settings: Settings, database_url: str):
    """The app on SQLite and on PostgreSQL, with the batch worker off (tests run its ticks themselves)."""
    app = create_app(settings.model_copy(update={"database_url": database_url, "batch_worker": "off"}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            client.app = app
            yield client

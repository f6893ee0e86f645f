import pytest

from server.db.session import create_engine


@pytest.fixture
async def engine(database_url: str):
    """An engine on `database_url` (SQLite and PostgreSQL, by its parameters), not migrated."""
    engine = create_engine(database_url, timeout_s=5)
    yield engine
    await engine.dispose()

import asyncio

import pytest

from server.db import migrate
from server.db.session import create_engine, session_factory


@pytest.fixture
async def sessions(database_url: str):
    """A migrated, empty database (SQLite and PostgreSQL, by `database_url`'s parameters)."""
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()

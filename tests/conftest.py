import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from server.core.config import Settings
from server.ml import matvec
from server.ml.offline import build_standins
from tests.support.app import serving
from tests.support.servers import PostgresServer, RedisServer

_databases = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def matvec_built() -> None:
    """Our one-row kernel built before any test starts a server: the first build on a machine takes about 35 s,
    longer than a server's start is given in the tests."""
    assert matvec.has("float32"), matvec.build()[1]


@pytest.fixture(scope="session")
def standins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny random-weight generator and classifier, built once per test session."""
    return build_standins(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.destroy()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own (tests stop and restart it)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test gets an empty database: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"test_{next(_databases)}"
    asyncio.run(_create_database(server, name))
    yield server.url(name)


async def _create_database(server: PostgresServer, name: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(host="127.0.0.1", port=server.port, user="test", database="postgres")
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


@pytest.fixture
def settings(standins: tuple[Path, Path], tmp_path: Path) -> Settings:
    generator, classifier = standins
    return Settings(
        _env_file=None,
        generator_model=str(generator),
        sentiment_model=str(classifier),
        model_source="local",
        models_cache_dir=tmp_path / "cache",
        # The CPU even on a GPU machine: these tests check CPU names and outputs (tests/ml/test_cuda.py
        # asks for the GPU itself).
        device="cpu",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'server.db'}",
        torch_num_threads=1,
        record_flush_interval_ms=20,
        record_spill_dir=tmp_path / "spill",
        ingress_rate_limit="off",
        files_dir=tmp_path / "files",
    )


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, over an in-process transport; `client.app` is the app."""
    async with serving(settings) as client:
        yield client

"""Async engine and session factory for `DATABASE_URL` (SQLite via aiosqlite, PostgreSQL via asyncpg)."""

from pathlib import Path
from typing import Any, cast

from sqlalchemy.engine import CursorResult, Result, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def ensure_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its folder (`./data/` on a fresh clone)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def timeout_options(url: str, timeout_s: float) -> dict:
    """Engine options that bound every wait on the database by `timeout_s`: PostgreSQL's connect, statements
    and turn for a pooled connection; SQLite's wait for a file another connection has locked."""
    if make_url(url).get_backend_name() == "postgresql":
        return {"pool_timeout": timeout_s, "connect_args": {"timeout": timeout_s, "command_timeout": timeout_s}}
    return {"connect_args": {"timeout": timeout_s}}


def create_engine(url: str, *, timeout_s: float | None = None) -> AsyncEngine:
    """`timeout_s` (DATABASE_TIMEOUT_S) bounds each connect and statement; None leaves the drivers' defaults,
    for work that may wait long on purpose (migrations waiting for another process's lock)."""
    ensure_sqlite_directory(url)
    return create_async_engine(url, pool_pre_ping=True, **(timeout_options(url, timeout_s) if timeout_s else {}))


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def affected(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched. `execute` is typed as returning `Result`, though for DML statements
    it returns a `CursorResult`, which alone carries the count."""
    return cast(CursorResult[Any], result).rowcount

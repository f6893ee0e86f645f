"""Async engine and session factory for `DATABASE_URL` (SQLite via aiosqlite, PostgreSQL via asyncpg)."""

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import aiosqlite
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


class SQLiteConnection(aiosqlite.Connection):
    """An aiosqlite connection whose `stop()` queues the worker thread's stop once; every later call waits on that
    same stop.

    SQLAlchemy ends a connection whose statement was cancelled with a graceful `close()` in a shielded task, and,
    when the caller is cancelled again meanwhile, a forced `stop()`. aiosqlite's `close()` ends with its own
    `stop()`, which queues a second stop behind the first: the worker thread exits at the first, so nothing ever
    answers the second, and the closing task never ends. Shutdown (a server's, or `asyncio.run`'s cancellation of
    leftover tasks) then waits on it forever. That happens when a cancelled statement was waiting for a lock
    another connection held, the usual case at shutdown."""

    _stopping: "asyncio.Future[Any] | None" = None
    _stop_queued = False

    def stop(self) -> "asyncio.Future[Any] | None":
        if not self._stop_queued:
            self._stop_queued = True
            self._stopping = super().stop()
        # Shielded so that one cancelled waiter does not cancel the stop the others wait on.
        return None if self._stopping is None else asyncio.shield(self._stopping)


def sqlite_connector(url: str, connect_args: dict) -> Callable[[], Awaitable[aiosqlite.Connection]]:
    """What `async_creator` needs to open `SQLiteConnection`s with the arguments SQLAlchemy would have passed."""
    parsed = make_url(url)
    args, options = parsed.get_dialect()().create_connect_args(parsed)
    connector = partial(sqlite3.connect, *args, **{**options, **connect_args})

    async def connect() -> aiosqlite.Connection:
        connection = SQLiteConnection(connector, iter_chunk_size=64)
        # As SQLAlchemy's own aiosqlite connect does: a connection left open must not keep the process alive.
        connection._thread.daemon = True
        return await connection

    return connect


def create_engine(url: str, *, timeout_s: float | None = None) -> AsyncEngine:
    """`timeout_s` (DATABASE_TIMEOUT_S) bounds each connect and statement; None leaves the drivers' defaults,
    for work that may wait long on purpose (migrations waiting for another process's lock)."""
    ensure_sqlite_directory(url)
    options: dict[str, Any] = timeout_options(url, timeout_s) if timeout_s else {}
    if make_url(url).get_driver_name() == "aiosqlite":
        options = {"async_creator": sqlite_connector(url, options.get("connect_args", {}))}
    return create_async_engine(url, pool_pre_ping=True, **options)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def affected(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched. `execute` is typed as returning `Result`, though for DML statements
    it returns a `CursorResult`, which alone carries the count."""
    return cast(CursorResult[Any], result).rowcount

"""The SQLite engine: its connections honour the URL and the timeout, and a statement cancelled while it waits
for a lock leaves nothing behind that never ends."""

import asyncio
import sqlite3
import threading
import time

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from server.db.session import SQLiteConnection, create_engine
from tests.support.waiting import until


async def test_sqlite_connections_open_the_urls_file_and_wait_for_a_lock_only_timeout_s(tmp_path):
    path = tmp_path / "nested" / "app.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}", timeout_s=0.5)
    holder = await engine.connect()
    try:
        await holder.execute(text("CREATE TABLE t (x INTEGER)"))
        await holder.commit()
        raw = await holder.get_raw_connection()
        assert isinstance(raw.driver_connection, SQLiteConnection)
        await holder.execute(text("BEGIN IMMEDIATE"))
        await holder.execute(text("INSERT INTO t VALUES (1)"))
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"):
            async with engine.begin() as writer:
                await writer.execute(text("INSERT INTO t VALUES (2)"))
        assert 0.4 < time.monotonic() - started < 5
    finally:
        await holder.rollback()
        await holder.close()
        await engine.dispose()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone() == (0,)


async def test_a_statement_cancelled_twice_while_it_waits_for_a_lock_leaves_no_task_that_never_ends(tmp_path):
    """Cancelled once, SQLAlchemy closes the connection gracefully in a task of its own; cancelled again meanwhile,
    it also stops the connection's thread. aiosqlite's own connection then left that closing task waiting forever
    on a second stop, and `asyncio.run` (a server's shutdown) with it."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", timeout_s=5)
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE t (x INTEGER)"))
    holder = await engine.connect()
    await holder.execute(text("BEGIN IMMEDIATE"))
    await holder.execute(text("INSERT INTO t VALUES (1)"))
    before = asyncio.all_tasks()

    async def write() -> None:
        async with engine.begin() as writer:
            await writer.execute(text("INSERT INTO t VALUES (2)"))

    # Cancelled only once its INSERT is in the connection's thread: a loaded CI machine once took longer than a fixed
    # wait to get there, and a cancel before it leaves no closing task to test.
    waiting = threading.Event()

    def sent(conn, cursor, statement, *args) -> None:
        if "VALUES (2)" in statement:
            waiting.set()

    event.listen(engine.sync_engine, "before_cursor_execute", sent)
    writing = asyncio.create_task(write())
    await until(waiting.is_set, 5)
    await asyncio.sleep(0.1)
    writing.cancel()
    await asyncio.sleep(0.05)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    leftovers = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert leftovers, "the cancelled statement should have left its connection closing in a task of its own"
    await holder.rollback()
    await holder.close()
    _, pending = await asyncio.wait(leftovers, timeout=10)
    for task in pending:
        task.cancel()
    await engine.dispose()
    assert not pending

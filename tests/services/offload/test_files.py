"""The file store of /v1/files: chunked writes under a size limit, tenant scope, pages, deletion and retention."""

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from server.core.clock import now
from server.db import migrate
from server.db.batch_models import StoredFile
from server.db.session import create_engine, session_factory
from server.services.offload.files import FileStore, FileTooLarge, aiter_lines
from server.services.offload.jobs import JobNotFound


@pytest.fixture
async def store(database_url: str, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    yield FileStore(session_factory(engine), tmp_path / "files", max_bytes=100, retention=timedelta(days=1))
    await engine.dispose()


async def chunks(*parts: bytes):
    for part in parts:
        yield part


async def content(store: FileStore, file_id: str, tenant: str | None) -> bytes:
    return b"".join([chunk async for chunk in await store.content(file_id, tenant)])


async def test_a_file_is_stored_in_chunks_and_read_back_by_its_tenant_only(store):
    row = await store.create("acme", "in.jsonl", "batch", chunks(b'{"a": 1}\n', b'{"b": 2}\n'))
    assert row.bytes == 18 and row.id.startswith("file-")
    assert await content(store, row.id, "acme") == b'{"a": 1}\n{"b": 2}\n'
    assert await content(store, row.id, None) == b'{"a": 1}\n{"b": 2}\n'
    with pytest.raises(JobNotFound):
        await store.get(row.id, "other")
    with pytest.raises(JobNotFound):
        await store.content(row.id, "other")
    assert [lines async for lines in aiter_lines(store.path(row.id), batch=1)] == [
        [(1, b'{"a": 1}\n')],
        [(2, b'{"b": 2}\n')],
    ]


async def test_past_the_size_limit_nothing_is_kept(store):
    with pytest.raises(FileTooLarge):
        await store.create("acme", "big.jsonl", "batch", chunks(b"x" * 60, b"y" * 60))
    assert list(store.directory.iterdir()) == []
    assert await store.page("acme") == ([], False)


async def test_pages_are_newest_first_and_deletion_removes_the_bytes(store):
    rows = [await store.create("acme", f"{i}.jsonl", "batch", chunks(b"x\n")) for i in range(3)]
    await store.create("other", "theirs.jsonl", "batch", chunks(b"x\n"))
    first, more = await store.page("acme", limit=2)
    assert [r.id for r in first] == [rows[2].id, rows[1].id] and more
    rest, more = await store.page("acme", limit=2, after=first[-1].id)
    assert [r.id for r in rest] == [rows[0].id] and not more
    assert (await store.page("acme", purpose="batch_output")) == ([], False)
    await store.delete(rows[0].id, "acme")
    assert not store.path(rows[0].id).exists()
    with pytest.raises(JobNotFound):
        await store.delete(rows[0].id, "acme")


async def test_files_past_their_retention_are_gone(store):
    kept = await store.create("acme", "new.jsonl", "batch", chunks(b"x\n"))
    old = await store.create("acme", "old.jsonl", "batch", chunks(b"x\n"))
    async with store.sessions() as session, session.begin():
        await session.execute(
            update(StoredFile).where(StoredFile.id == old.id).values(expires_at=now() - timedelta(seconds=1))
        )
    with pytest.raises(JobNotFound):
        await store.get(old.id, "acme")
    assert await store.purge_expired() == 1
    assert not store.path(old.id).exists() and store.path(kept.id).exists()
    assert [r.id for r in (await store.page("acme"))[0]] == [kept.id]

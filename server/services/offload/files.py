"""The files of `/v1/files`: batch input files uploaded by clients, and the output and error files of batches.

The bytes go to a directory (FILES_DIR), one file per id, written and read in chunks off the event loop; the metadata
(tenant, name, purpose, size, expiry) goes to the `files` table. A directory rather than a database column: a batch
file may be 200 MB, which a row would have to hold whole in memory on both ends, while a file streams in and out in
bounded chunks. A file belongs to its tenant (another tenant's id is not found) and is deleted FILES_RETENTION_DAYS
after its creation. A file is written under a temporary name and renamed once complete, so a reader never sees half
of one.
"""

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import anyio
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.db.batch_models import StoredFile
from server.services.offload.jobs import JobNotFound

CHUNK = 1024 * 1024


class FileTooLarge(ValueError):
    """HTTP 413: the upload passed MAX_BATCH_FILE_BYTES."""


class FileStore:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], directory: Path, *, max_bytes: int, retention: timedelta
    ):
        self.sessions = sessions
        self.directory = directory
        self.max_bytes = max_bytes
        self.retention = retention

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    async def create(self, tenant: str, filename: str, purpose: str, chunks: AsyncIterable[bytes]) -> StoredFile:
        """Store `chunks` as a new file of `tenant`; `FileTooLarge` (and nothing stored) past the size limit."""
        await self.purge_expired()
        file_id = f"file-{uuid.uuid4().hex}"
        partial = self.path(f".{file_id}.part")
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        size = 0
        try:
            async with await anyio.open_file(partial, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FileTooLarge(f"file larger than MAX_BATCH_FILE_BYTES ({self.max_bytes} bytes)")
                    await out.write(chunk)
            await anyio.Path(partial).rename(self.path(file_id))
        except BaseException:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        at = clock.now()
        row = StoredFile(
            id=file_id,
            tenant=tenant,
            filename=filename[:255],
            purpose=purpose,
            bytes=size,
            created_at=at,
            expires_at=at + self.retention,
        )
        async with self.sessions() as session, session.begin():
            session.add(row)
        return row

    async def get(self, file_id: str, tenant: str | None) -> StoredFile:
        """The file, if it exists, has not expired and belongs to `tenant` (None: any tenant); else `JobNotFound`."""
        async with self.sessions() as session:
            row = await session.get(StoredFile, file_id)
        if row is None or (tenant is not None and row.tenant != tenant) or utc(row.expires_at) <= clock.now():
            raise JobNotFound(f"no file {file_id!r}")
        return row

    async def page(
        self, tenant: str | None, *, purpose: str | None = None, limit: int = 100, after: str | None = None
    ) -> tuple[list[StoredFile], bool]:
        """Newest first, after the file `after`; and whether more follow."""
        await self.purge_expired()
        query = select(StoredFile).order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(StoredFile.tenant == tenant)
        if purpose is not None:
            query = query.where(StoredFile.purpose == purpose)
        if after is not None:
            cursor = await self.get(after, tenant)
            query = query.where(
                (StoredFile.created_at < cursor.created_at)
                | ((StoredFile.created_at == cursor.created_at) & (StoredFile.id < cursor.id))
            )
        async with self.sessions() as session:
            rows = list((await session.scalars(query)).all())
        return rows[:limit], len(rows) > limit

    async def delete(self, file_id: str, tenant: str | None) -> None:
        await self.get(file_id, tenant)
        await self._remove([file_id])

    async def _remove(self, file_ids: list[str]) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(delete(StoredFile).where(StoredFile.id.in_(file_ids)))
        for file_id in file_ids:
            await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)

    async def purge_expired(self) -> int:
        """Delete the files past their retention; how many."""
        async with self.sessions() as session:
            ids = list((await session.scalars(select(StoredFile.id).where(StoredFile.expires_at <= clock.now()))).all())
        if ids:
            await self._remove(ids)
        return len(ids)

    async def content(self, file_id: str, tenant: str | None) -> AsyncIterator[bytes]:
        """The file's bytes in chunks (checked before the first chunk is asked for)."""
        await self.get(file_id, tenant)
        return self._chunks(self.path(file_id))

    @staticmethod
    async def _chunks(path: Path) -> AsyncIterator[bytes]:
        async with await anyio.open_file(path, "rb") as source:
            while chunk := await source.read(CHUNK):
                yield chunk


def utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored timestamp is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_lines(path: Path) -> Iterator[bytes]:
    """The lines of a stored file, one at a time (blocking: iterate it in a thread)."""
    with open(path, "rb") as source:
        yield from source


async def aiter_lines(path: Path, batch: int = 500) -> AsyncIterator[list[tuple[int, bytes]]]:
    """(line number from 1, line) in lists of `batch`, read in a thread so that a large file never blocks the loop
    nor sits in memory whole."""
    lines = enumerate(read_lines(path), 1)

    def take() -> list[tuple[int, bytes]]:
        return list(islice(lines, batch))

    while chunk := await asyncio.to_thread(take):
        yield chunk

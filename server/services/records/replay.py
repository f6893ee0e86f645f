"""Replay of spill files: rows kept on disk are written to their database, exactly once.

Only files of the current database are replayed (others are reported and left alone). Each file is claimed
(atomic rename), written through `store.BatchWrite` (idempotent on the record id, so a file replayed twice,
or a replay of rows already stored, changes nothing), then removed; rows the database still rejects go to a
new `rejected` file. If the database fails (timeout, unavailable, error), the file is given back whole and
the replay stops: later files would fail the same way. Each transaction is bounded by the database timeout,
so a database that is down costs a start one timeout, not a hang.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import metrics
from server.core.config import Settings
from server.db.session import create_engine, session_factory
from server.services.records.spill import (
    Kind,
    SpillFormatError,
    claim,
    database_identity,
    read_header,
    read_records,
    release,
    spill_files,
    unclaimed_name,
    write_spill,
)
from server.services.records.store import BatchWrite, classify, describe

log = logging.getLogger(__name__)


@dataclass
class FileReport:
    path: Path
    inserted: int = 0
    present: int = 0
    rejected: int = 0
    rejected_to: Path | None = None
    other_database: str | None = None
    unreadable: str | None = None
    failed: str | None = None  # the database failed: the file is kept whole for a later replay

    def __str__(self) -> str:
        if self.other_database is not None:
            return f"{self.path}: left alone, it belongs to {self.other_database}"
        if self.unreadable is not None:
            return f"{self.path}: unreadable, left alone ({self.unreadable})"
        if self.failed is not None:
            return f"{self.path}: not replayed, kept for a later replay (the database failed: {self.failed})"
        rejected = f", {self.rejected} still rejected (now in {self.rejected_to})" if self.rejected else ""
        return f"{self.path}: {self.inserted} replayed, {self.present} already present{rejected}"


async def _replay_file(
    sessions: async_sessionmaker[AsyncSession], path: Path, database: str, *, timeout_s: float, chunk_size: int
) -> FileReport | None:
    """None when another process claimed the file first."""
    report = FileReport(unclaimed_name(path))
    try:
        header = await asyncio.to_thread(read_header, path)
    except FileNotFoundError:
        return None
    except (SpillFormatError, OSError) as exc:
        report.unreadable = str(exc)
        return report
    if header["database"] != database:
        report.other_database = header["database"]
        return report
    claimed = await asyncio.to_thread(claim, path)
    if claimed is None:
        return None
    try:
        write = BatchWrite(await asyncio.to_thread(read_records, claimed), chunk_size)
        await write.run(sessions, timeout_s)
    except SpillFormatError as exc:
        report.unreadable = str(exc)
    except Exception as exc:
        report.failed = f"{classify(exc)}: {describe(exc)}"
    except BaseException:
        release(claimed)  # cancelled (shutdown): at once, not in a thread that could be cancelled too
        raise
    if report.unreadable or report.failed:
        await asyncio.to_thread(release, claimed)
        return report
    report.inserted, report.present, report.rejected = write.inserted, write.present, len(write.rejected)
    for table, count in write.written.items():
        metrics.RECORDS_WRITTEN.labels(table).inc(count)
    if write.rejected:
        report.rejected_to = await asyncio.to_thread(write_spill, claimed.parent, database, "rejected", write.rejected)
    await asyncio.to_thread(claimed.unlink)
    return report


async def replay_spill(
    sessions: async_sessionmaker[AsyncSession],
    spill_dir: Path,
    database: str,
    *,
    timeout_s: float,
    chunk_size: int,
    kinds: Sequence[Kind] = ("records",),
) -> list[FileReport]:
    """Replay the spill files of `database` (as `database_identity` names it), oldest first."""
    reports = []
    for path in await asyncio.to_thread(spill_files, spill_dir, kinds):
        report = await _replay_file(sessions, path, database, timeout_s=timeout_s, chunk_size=chunk_size)
        if report is not None:
            reports.append(report)
            if report.failed is not None:
                break
    return reports


def _rejected_rows(spill_dir: Path, database: str) -> tuple[int, int]:
    """(files, rows) of this database's rejected files."""
    files = rows = 0
    for path in spill_files(spill_dir, ("rejected",)):
        try:
            header = read_header(path)
        except (SpillFormatError, OSError):
            continue
        if header["database"] == database:
            files, rows = files + 1, rows + header["rows"]
    return files, rows


async def replay_now(settings: Settings, *, kinds: Sequence[Kind] = ("records",)) -> list[FileReport]:
    """Replay on demand (`python -m server db replay-spill`), on an engine of its own."""
    engine = create_engine(settings.database_url, timeout_s=settings.database_timeout_s)
    try:
        return await replay_spill(
            session_factory(engine),
            settings.record_spill_dir,
            database_identity(settings.database_url),
            timeout_s=settings.database_timeout_s,
            chunk_size=settings.record_flush_max_items,
            kinds=kinds,
        )
    finally:
        await engine.dispose()


async def replay_at_start(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    """Replay this database's spill files before serving, and say what is left; never fails the start."""
    database = database_identity(settings.database_url)
    reports = await replay_spill(
        sessions,
        settings.record_spill_dir,
        database,
        timeout_s=settings.database_timeout_s,
        chunk_size=settings.record_flush_max_items,
    )
    for report in reports:
        if report.failed or report.unreadable:
            log.warning("spill file %s", report)
        elif report.other_database is None:
            log.info("spill file %s", report)
    others = sum(report.other_database is not None for report in reports)
    if others:
        log.info("%d spill files in %s belong to other databases: left alone", others, settings.record_spill_dir)
    files, rows = await asyncio.to_thread(_rejected_rows, settings.record_spill_dir, database)
    if rows:
        log.warning(
            "%d records the database rejected are kept in %d files in %s; "
            "`python -m server db replay-spill --rejected` retries them",
            rows,
            files,
            settings.record_spill_dir,
        )

"""Idempotent, isolating inserts of records: the one place that writes record rows to the database.

`BatchWrite` inserts rows in transactions of at most `chunk_size` rows, each under a timeout, with
`INSERT ... ON CONFLICT (id) DO NOTHING`, so a row written twice (a replayed spill file, a retry after a
commit whose answer was lost) is stored once. A failure is classified by `classify`:
- `rejected`: the database refused a row's data (PostgreSQL SQLSTATE classes 22 and 23, e.g. a NUL in
  text; a value the driver cannot encode). The chunk is split in halves until each bad row stands alone,
  so every good row lands and each bad row is set aside with its reason;
- `timeout`, `unavailable` (cannot connect, connection lost, locked, out of resources) and `error` (any
  other failure of the whole statement, e.g. a missing table): the write stops and the rows not yet
  written stay in `remaining`, to be retried later.
Request records (`requests`) are added to the per-minute rollups in the same transaction, only those the insert
reports as new (`analytics.rollups`).
"""

import asyncio
import functools
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from sqlalchemy import Table
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.services.analytics.rollups import INSERTS, REQUESTS, add_to_rollups

Reason = Literal["timeout", "unavailable", "error", "rejected"]
# PostgreSQL SQLSTATE classes: 22 data exception, 23 integrity violation (the row's fault); 08 connection,
# 40 transaction rollback, 53 insufficient resources, 57 operator intervention, 58 system error (the server's).
REJECTED_SQLSTATES = ("22", "23")
UNAVAILABLE_SQLSTATES = ("08", "40", "53", "57", "58")
REASON_MAX_CHARS = 300


class Record(NamedTuple):
    table: Table
    row: dict


SQLITE_ERROR = 1  # sqlite3's primary result code for an error in the statement itself


def classify(exc: BaseException) -> Reason:
    """Whether the rows (`rejected`) or the database (`timeout`, `unavailable`, `error`) caused a failed write."""
    if any(isinstance(cause, TimeoutError) for cause in (exc, getattr(exc, "orig", None), exc.__cause__)):
        return "timeout"
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    if isinstance(exc, DataError | IntegrityError) or state[:2] in REJECTED_SQLSTATES:
        return "rejected"
    if isinstance(exc, DBAPIError):
        unavailable = (
            isinstance(exc, OperationalError | InterfaceError)
            and not _sqlite_generic_error(exc)
            or exc.connection_invalidated
            or state[:2] in UNAVAILABLE_SQLSTATES
        )
        return "unavailable" if unavailable else "error"
    if isinstance(exc, StatementError | ValueError | TypeError):
        return "rejected"
    return "unavailable" if isinstance(exc, OSError) else "error"


def _sqlite_generic_error(exc: DBAPIError) -> bool:
    """SQLite's SQLITE_ERROR (a missing table or column, bad SQL): its driver raises OperationalError for it as for
    a locked or unopenable file, so the result code tells the database's fault from its unavailability."""
    orig = exc.orig
    for error in (orig, getattr(orig, "__cause__", None)):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF == SQLITE_ERROR
    return False


def describe(exc: BaseException) -> str:
    """The error in one short line: the driver's own exception and message, without SQL and parameters."""
    orig = getattr(exc, "orig", None) or exc
    driver = orig.__cause__ or orig  # asyncpg's exception behind SQLAlchemy's adapter
    lines = str(orig).splitlines()
    return (f"{type(driver).__name__}: {lines[0]}" if lines else type(driver).__name__)[:REASON_MAX_CHARS]


@functools.cache
def _statement(dialect: str, table: Table):
    """Built once per table, as the rollups' statement is: SQLAlchemy memoizes a statement's cache key on the object.
    Built anew and keyed at every flush, the two took half of a one-row flush's CPU on the event loop, beside the
    decoding (2.36 against 1.22 ms on an AMD EPYC Zen 4)."""
    try:
        insert = INSERTS[dialect]
    except KeyError:
        raise RuntimeError(f"records are written to SQLite or PostgreSQL, not {dialect}") from None
    return insert(table).on_conflict_do_nothing(index_elements=["id"]).returning(table.c.id)


async def insert_records(
    sessions: async_sessionmaker[AsyncSession], records: Sequence[Record], timeout_s: float
) -> int:
    """Insert `records` in one transaction (one statement per table); returns how many were new."""
    by_table: dict[Table, list[dict]] = {}
    for record in records:
        by_table.setdefault(record.table, []).append(record.row)
    inserted = 0
    async with asyncio.timeout(timeout_s):
        async with sessions() as session, session.begin():
            dialect = session.get_bind().dialect.name
            for table, rows in by_table.items():
                new_ids = set((await session.execute(_statement(dialect, table), rows)).scalars())
                inserted += len(new_ids)
                if table is REQUESTS:
                    await add_to_rollups(session, [row for row in rows if row["id"] in new_ids])
    return inserted


class BatchWrite:
    """One pass over `records`; its counters and `remaining` stay exact if `run` fails or is cancelled."""

    def __init__(self, records: Iterable[Record], chunk_size: int):
        records = list(records)
        self.chunks: deque[list[Record]] = deque(
            records[i : i + chunk_size] for i in range(0, len(records), chunk_size)
        )
        self.inserted = 0
        self.present = 0
        self.written: Counter[str] = Counter()  # rows now stored (new or already present), by table
        self.rejected: list[tuple[Record, str]] = []

    @property
    def remaining(self) -> list[Record]:
        return [record for chunk in self.chunks for record in chunk]

    async def run(self, sessions: async_sessionmaker[AsyncSession], timeout_s: float) -> None:
        """Write every chunk, isolating rejected rows; any other failure is raised with the rest in `remaining`."""
        while self.chunks:
            chunk = self.chunks[0]
            try:
                inserted = await insert_records(sessions, chunk, timeout_s)
            except Exception as exc:
                if classify(exc) != "rejected":
                    raise
                self.chunks.popleft()
                if len(chunk) == 1:
                    self.rejected.append((chunk[0], describe(exc)))
                else:
                    middle = len(chunk) // 2
                    self.chunks.extendleft([chunk[middle:], chunk[:middle]])
                continue
            self.chunks.popleft()
            self.inserted += inserted
            self.present += len(chunk) - inserted
            self.written.update(record.table.name for record in chunk)

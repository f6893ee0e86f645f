"""Database records written behind the response, in batches: never lost, and no row blocks the others.

Requests only append rows to an in-memory buffer (`add`: no I/O). A background task writes them every
`flush_interval_s`, sooner once `max_items` rows wait, through `store.BatchWrite`: transactions of at most
`max_items` rows, each bounded by `timeout_s`, idempotent on the record id. Then:
- a row the database rejects (e.g. a NUL in PostgreSQL text) is isolated, its batch-mates land, and it is
  written with the reason to a `rejected` spill file and counted (`record_write_failures_total{reason=
  "rejected"}`);
- a failed write (`timeout`, `unavailable`, `error`) keeps the rows buffered, is counted under its reason,
  and the writer backs off (doubling up to MAX_BACKOFF_S) whatever wakes it; warnings are logged at most
  every WARN_INTERVAL_S per kind, with the number held back;
- past `buffer_max` rows in memory, new rows go to a spill file instead (memory stays bounded, nothing is
  dropped); once the database takes writes again and the buffer has drained, the writer replays them.
The background task is supervised (`server/core/supervisor.py`, task `record-writer`): an unexpected error in it
is logged with its traceback, counted, and the task restarts with backoff, the buffered rows kept; the writer reads
`degraded` meanwhile. `close()` flushes what is left within `shutdown_timeout_s`, then spills what is still pending
and logs why it could not be written. Spill files are replayed at the next start (`replay.replay_at_start`).
"""

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import metrics
from server.core.aio import wait_event
from server.core.config import Settings
from server.core.supervisor import Supervisor
from server.core.throttled_log import ThrottledLog
from server.db.models import Base
from server.services.records.replay import replay_spill
from server.services.records.spill import Entry, Kind, database_identity, write_spill
from server.services.records.store import BatchWrite, Reason, Record, classify, describe

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
CLOSE_ATTEMPTS = 3
WARN_INTERVAL_S = 30.0
REPLAY_HINT = "replayed at the next start, or now by `python -m server db replay-spill`"


@dataclass(frozen=True)
class Failure:
    reason: Reason
    error: str

    def explain(self, timeout_s: float) -> str:
        if self.reason == "timeout":
            return f"the database did not answer within {timeout_s:g} s"
        if self.reason == "unavailable":
            return f"the database was unavailable: {self.error}"
        return f"the database failed the write: {self.error}"


@dataclass(frozen=True)
class RecordsStatus:
    """What `/health` reports. `degraded`: the last write failed, or the backlog is not shrinking (more than
    `max_items` rows pending now and already more than that right after the last flush)."""

    pending: int
    spilled: int
    rejected: int
    failures_by_reason: dict[str, int]
    last_error: str | None
    degraded: bool
    # The background task's supervisor: state, failures, last error (see `Supervisor.status`).
    task: dict


class RecordWriter:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        database_url: str,
        flush_interval_s: float,
        max_items: int,
        spill_dir: Path,
        timeout_s: float = 5.0,
        shutdown_timeout_s: float = 10.0,
        buffer_max: int = 100_000,
    ):
        self.sessions = sessions
        self.database = database_identity(database_url)
        self.flush_interval_s = flush_interval_s
        self.max_items = max_items
        self.spill_dir = spill_dir
        self.timeout_s = timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.buffer_max = buffer_max
        self._pending: list[Record] = []
        self._overflow: list[Entry] = []
        self._rejected: list[Entry] = []
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._writing = asyncio.Lock()
        self._spilling = asyncio.Lock()
        self.supervisor = Supervisor("record-writer", self._run)
        self._spiller: asyncio.Task | None = None
        self._spilled_to_replay = False
        self._failing = False
        self._pending_after_flush = 0
        self.failures: Counter[str] = Counter()
        self.last_failure: Failure | None = None
        self.spilled = 0
        self.rejected = 0
        self._warnings = ThrottledLog(log, WARN_INTERVAL_S)

    @classmethod
    def from_settings(cls, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> "RecordWriter":
        return cls(
            sessions,
            database_url=settings.database_url,
            flush_interval_s=settings.record_flush_interval_ms / 1000,
            max_items=settings.record_flush_max_items,
            spill_dir=settings.record_spill_dir,
            timeout_s=settings.database_timeout_s,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            buffer_max=settings.record_buffer_max,
        )

    def start(self) -> None:
        self.supervisor.start()

    def add(self, table: type[Base], rows: Sequence[dict]) -> None:
        """Buffer `rows` for writing; beyond `buffer_max` buffered rows, they go to a spill file instead."""
        room = max(0, self.buffer_max - len(self._pending))
        self._pending.extend(Record(table.__table__, row) for row in rows[:room])
        if len(rows) > room:
            self._overflow.extend((Record(table.__table__, row), None) for row in rows[room:])
            if self._spiller is None or self._spiller.done():
                self._spiller = asyncio.create_task(self._drain_spills(), name="record-spiller")
        metrics.RECORDS_PENDING.set(len(self._pending))
        if len(self._pending) >= self.max_items:
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def status(self) -> RecordsStatus:
        backlog = len(self._pending) > self.max_items and self._pending_after_flush > self.max_items
        # A task that is not running (restarting or given up) writes nothing: rows only pile up.
        down = self.supervisor.state in ("restarting", "failed")
        return RecordsStatus(
            len(self._pending),
            self.spilled,
            self.rejected,
            dict(self.failures),
            self.last_failure.error if self.last_failure else None,
            self._failing or backlog or down,
            self.supervisor.status(),
        )

    async def flush(self) -> bool:
        """Write every row buffered now; False when the database failed, the unwritten rows staying buffered.

        Rows the database rejects do not fail the flush: they go to a `rejected` spill file. Flushes run one
        at a time, so when this returns True every row added before the call is stored or set aside
        (including rows a background flush had already taken).
        """
        async with self._writing:
            taken = len(self._pending)
            if not taken:
                return True
            write = BatchWrite(self._pending[:taken], self.max_items)
            failure = None
            try:
                await write.run(self.sessions, self.timeout_s)
            except Exception as exc:
                failure = Failure(classify(exc), describe(exc))
            finally:
                self._settle(taken, write)
            if self._rejected:
                await self._drain_spills()
            self._account(failure, len(write.remaining))
            return failure is None

    def _settle(self, taken: int, write: BatchWrite) -> None:
        """Keep the rows `write` did not get to, set aside the rejected ones: exact even when cancelled."""
        self._pending[:taken] = write.remaining
        self._pending_after_flush = len(self._pending)
        metrics.RECORDS_PENDING.set(len(self._pending))
        for table, count in write.written.items():
            metrics.RECORDS_WRITTEN.labels(table).inc(count)
        if write.rejected:
            self._rejected.extend(write.rejected)
            self.rejected += len(write.rejected)
            self.failures["rejected"] += len(write.rejected)
            metrics.RECORD_WRITE_FAILURES.labels("rejected").inc(len(write.rejected))

    def _account(self, failure: Failure | None, kept: int) -> None:
        if failure is None:
            if self._failing:
                log.info("records are written again")
            self._failing = False
            return
        self._failing = True
        self.last_failure = failure
        self.failures[failure.reason] += 1
        metrics.RECORD_WRITE_FAILURES.labels(failure.reason).inc()
        self._warnings.warning(
            "failure",
            "writing records failed (%s); %d records stay buffered and are retried with backoff",
            failure.explain(self.timeout_s),
            kept,
        )

    async def _drain_spills(self) -> list[Path]:
        """Write overflow and rejected rows to spill files; rows leave memory only once their file exists."""
        paths = []
        async with self._spilling:
            while self._overflow or self._rejected:
                kind: Kind
                kind, queue = ("records", self._overflow) if self._overflow else ("rejected", self._rejected)
                entries = queue[:]
                try:
                    path = await asyncio.to_thread(write_spill, self.spill_dir, self.database, kind, entries)
                except OSError as exc:
                    self._warnings.warning(
                        "spill",
                        "could not write %d records to a spill file in %s (%s); they stay in memory",
                        len(entries),
                        self.spill_dir,
                        exc,
                    )
                    break
                del queue[: len(entries)]
                self._spilled(kind, entries, path)
                paths.append(path)
        return paths

    def _spilled(self, kind: Kind, entries: list[Entry], path: Path) -> None:
        if kind == "rejected":
            metrics.RECORDS_SPILLED.labels("rejected").inc(len(entries))
            self._warnings.warning(
                "rejected",
                "the database rejected %d records (first: %s); they are kept with the reasons in %s",
                len(entries),
                entries[0][1],
                path,
            )
            return
        self.spilled += len(entries)
        if self._stopping.is_set():
            metrics.RECORDS_SPILLED.labels("shutdown").inc(len(entries))  # `close` logs the summary
            return
        self._spilled_to_replay = True
        metrics.RECORDS_SPILLED.labels("overflow").inc(len(entries))
        self._warnings.warning(
            "overflow",
            "%d records already wait in memory (RECORD_BUFFER_MAX): %d more were written to %s",
            self.buffer_max,
            len(entries),
            path,
        )

    async def _replay_spilled(self) -> None:
        self._spilled_to_replay = False
        reports = await replay_spill(
            self.sessions, self.spill_dir, self.database, timeout_s=self.timeout_s, chunk_size=self.max_items
        )
        for report in reports:
            if report.other_database is None:
                log.info("spill file %s", report)
            if report.failed is not None:
                self._spilled_to_replay = True

    async def _run(self) -> None:
        failures = 0
        while True:
            if failures:
                await _wait(self._stopping, min(MAX_BACKOFF_S, self.flush_interval_s * 2**failures))
            else:
                await _wait(self._wakeup, self.flush_interval_s)
            if self._stopping.is_set():
                return
            self._wakeup.clear()
            if not await self.flush():
                failures += 1
                continue
            failures = 0
            if self._spilled_to_replay and not self._pending and not self._overflow:
                await self._replay_spilled()

    async def close(self) -> None:
        """Stop, write what is left within `shutdown_timeout_s`, and spill what could not be written."""
        self._stopping.set()
        self._wakeup.set()
        timed_out = False
        try:
            async with asyncio.timeout(self.shutdown_timeout_s):
                await self.supervisor.finished()
                for attempt in range(CLOSE_ATTEMPTS):
                    if await self.flush():
                        break
                    if attempt + 1 < CLOSE_ATTEMPTS:
                        await asyncio.sleep(self.flush_interval_s * 2**attempt)
                if self._spiller:
                    await self._spiller
        except TimeoutError:
            timed_out = True
        await self.supervisor.stop()
        if self._spiller and not self._spiller.done():
            self._spiller.cancel()
            # gather, not suppress(CancelledError): a cancellation of close() itself must still propagate.
            await asyncio.gather(self._spiller, return_exceptions=True)
        unwritten = len(self._pending) + len(self._overflow)
        self._overflow.extend((record, None) for record in self._pending)
        self._pending = []
        metrics.RECORDS_PENDING.set(0)
        paths = await self._drain_spills()
        lost = len(self._overflow) + len(self._rejected)
        if lost:
            log.error("%d records are LOST: no spill file could be written in %s", lost, self.spill_dir)
        elif unwritten:
            log.error(
                "%d records could not be written before shutdown (%s): written to %s, %s",
                unwritten,
                self._shutdown_cause(timed_out),
                ", ".join(map(str, paths)),
                REPLAY_HINT,
            )
        if self.rejected:
            log.warning(
                "the database rejected %d records during this run: they are in rejected-*.jsonl files in "
                "%s (`python -m server db replay-spill --rejected` retries them)",
                self.rejected,
                self.spill_dir,
            )

    def _shutdown_cause(self, timed_out: bool) -> str:
        failure = self.last_failure.explain(self.timeout_s) if self._failing and self.last_failure else None
        if timed_out:
            bound = f"SHUTDOWN_TIMEOUT_S={self.shutdown_timeout_s:g} s ran out"
            return f"{bound}; {failure}" if failure else f"{bound} while writing"
        return failure or "they arrived after the last write"


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    await wait_event(event, timeout_s)

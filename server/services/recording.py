"""Database records written behind the response, in batches.

Requests only append rows to an in-memory buffer; a background task inserts them with one statement per
table every `flush_interval_s` (sooner when `max_items` rows wait). A failed write keeps its rows, is
logged and counted, and is retried with backoff. `close()` flushes what is left; rows that still cannot
be written then are spilled to a JSON-lines file whose path is logged, so nothing is silently lost.
"""

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import metrics
from server.db.models import Base

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
CLOSE_ATTEMPTS = 3


class RecordWriter:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, flush_interval_s: float, max_items: int,
                 spill_dir: Path):
        self.sessions = sessions
        self.flush_interval_s = flush_interval_s
        self.max_items = max_items
        self.spill_dir = spill_dir
        self._pending: list[tuple[type[Base], dict]] = []
        self._wakeup = asyncio.Event()
        self._writing = asyncio.Lock()
        self._closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="record-writer")

    def add(self, table: type[Base], rows: Sequence[dict]) -> None:
        self._pending.extend((table, row) for row in rows)
        metrics.RECORDS_PENDING.set(len(self._pending))
        if len(self._pending) >= self.max_items:
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> bool:
        """Write everything buffered now; on failure the rows stay buffered and False is returned.

        Flushes run one at a time, so when this returns True, every row added before the call is stored
        (including rows a background flush had already taken).
        """
        async with self._writing:
            return await self._write_pending()

    async def _write_pending(self) -> bool:
        batch, self._pending = self._pending, []
        if not batch:
            return True
        by_table: dict[type[Base], list[dict]] = {}
        for table, row in batch:
            by_table.setdefault(table, []).append(row)
        try:
            async with self.sessions() as session, session.begin():
                for table, rows in by_table.items():
                    await session.execute(insert(table), rows)
        except Exception as exc:
            self._pending[:0] = batch
            metrics.RECORD_WRITE_FAILURES.inc()
            log.warning("writing %d records failed (%s: %s); they stay buffered and will be retried",
                        len(batch), type(exc).__name__, exc)
            return False
        finally:
            metrics.RECORDS_PENDING.set(len(self._pending))
        for table, rows in by_table.items():
            metrics.RECORDS_WRITTEN.labels(table.__tablename__).inc(len(rows))
        return True

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            delay = self.flush_interval_s if failures == 0 else min(MAX_BACKOFF_S, self.flush_interval_s * 2 ** failures)
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                pass
            self._wakeup.clear()
            if not self._closing:
                failures = 0 if await self.flush() else failures + 1

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task:
            await self._task
        for attempt in range(CLOSE_ATTEMPTS):
            if await self.flush():
                return
            await asyncio.sleep(self.flush_interval_s * 2 ** attempt)
        self._spill()

    def _spill(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"records-{time.strftime('%Y%m%dT%H%M%S')}-{id(self):x}.jsonl"
        with path.open("w", encoding="utf-8") as spill:
            for table, row in self._pending:
                spill.write(json.dumps({"table": table.__tablename__, "row": row}, default=str) + "\n")
        log.error("the database stayed unavailable at shutdown: %d records were written to %s instead",
                  len(self._pending), path)
        self._pending = []
        metrics.RECORDS_PENDING.set(0)

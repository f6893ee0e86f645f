"""Per-minute rollups of request records, written by the record writer in the transaction that inserts the records.

Only rows the insert reports as new (`RETURNING id`) are rolled up, and in the same transaction, so a record written
twice (a replayed spill file, a retry after a lost commit) is counted once. Each (tenant, minute, endpoint, model)
of a flush is one row of one `INSERT ... ON CONFLICT DO UPDATE` that adds its counts to what is stored.
"""

import bisect
import functools
from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import Table, case
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from server.core.tenants import DEFAULT_TENANT
from server.db.analytics_models import (
    ADDITIVE_COLUMNS,
    HISTOGRAM_COLUMNS,
    LATENCY_BOUNDS_MS,
    MetricRollup,
    RequestRecord,
)

TABLE = MetricRollup.__table__
REQUESTS = RequestRecord.__table__
INSERTS: dict[str, Callable[[Table], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql_insert,
    "sqlite": sqlite_insert,
}
KEY = ("tenant", "minute", "endpoint", "model")


def epoch_minute(moment: datetime) -> int:
    return int(moment.timestamp() // 60)


def bucket_of(latency_ms: float) -> int:
    """Index of the histogram bucket holding `latency_ms` (bounds are inclusive upper bounds)."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def rollup_rows(records: Iterable[dict]) -> list[dict]:
    """The rollup rows that `records` (rows of the requests table) add, one per (minute, endpoint, model)."""
    rows: dict[tuple, dict] = {}
    for record in records:
        # Rows spilled before tenants existed have none: the column's default, as in the table.
        key = (
            record.get("tenant", DEFAULT_TENANT),
            epoch_minute(record["created_at"]),
            record["endpoint"],
            record["model"],
        )
        row = rows.get(key)
        if row is None:
            row = rows[key] = (
                dict(zip(KEY, key, strict=True)) | dict.fromkeys(ADDITIVE_COLUMNS, 0) | {"latency_max_ms": 0.0}
            )
        latency = float(record["latency_ms"])
        row["requests"] += 1
        # Server errors only: a client's mistakes (400, 404, 422, 429, 499) say nothing about the server's health,
        # and counting them made a user's typos read as a failing server in the report.
        row["errors"] += record["status"] >= 500
        for field in ("items", "cached_items", "tokens_in", "tokens_out"):
            row[field] += record[field]
        row["latency_sum_ms"] += latency
        row["latency_max_ms"] = max(row["latency_max_ms"], latency)
        row[HISTOGRAM_COLUMNS[bucket_of(latency)]] += 1
    return list(rows.values())


async def add_to_rollups(session: AsyncSession, records: list[dict]) -> None:
    """Add `records` (new rows of the requests table) to the rollups, within the caller's transaction."""
    rows = rollup_rows(records)
    if not rows:
        return
    await session.execute(_upsert(session.get_bind().dialect.name), rows)


@functools.cache
def _upsert(dialect: str) -> postgresql.Insert | sqlite.Insert:
    """Built once per dialect, as the record inserts are (`records.store._statement`, which says what it saves)."""
    statement = INSERTS[dialect](TABLE)
    new = statement.excluded
    updates = {name: TABLE.c[name] + new[name] for name in ADDITIVE_COLUMNS}
    updates["latency_max_ms"] = case(
        (new.latency_max_ms > TABLE.c.latency_max_ms, new.latency_max_ms), else_=TABLE.c.latency_max_ms
    )
    return statement.on_conflict_do_update(index_elements=list(KEY), set_=updates)

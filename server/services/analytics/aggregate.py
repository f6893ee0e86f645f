"""Queries over the per-minute rollups: O(buckets) whatever the number of records.

Windows are read at one-minute resolution: a window covers the minutes that start in `[start, end)`. Buckets are
aligned to UTC (`hour`: whole hours, `day`: whole days). Percentiles come from the latency histogram: the upper
bound of the bucket holding the percentile (capped by the largest latency seen), so exact to one histogram bucket
(see `LATENCY_BOUNDS_MS`).
"""

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.db.analytics_models import HISTOGRAM_COLUMNS, LATENCY_BOUNDS_MS
from server.services.analytics.rollups import TABLE

BucketSize = Literal["minute", "hour", "day"]
MINUTES = {"minute": 1, "hour": 60, "day": 1440}
COUNTERS = ("requests", "items", "errors", "cached_items", "tokens_in", "tokens_out")


@dataclass
class Stats:
    """Counts of a bucket or a window and what follows from them."""

    start: datetime
    end: datetime
    requests: int = 0
    items: int = 0
    errors: int = 0
    cached_items: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * len(HISTOGRAM_COLUMNS))

    def add(self, other: "Stats") -> None:
        for name in (*COUNTERS, "latency_sum_ms"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_max_ms = max(self.latency_max_ms, other.latency_max_ms)
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    def percentile(self, q: float) -> float | None:
        """The latency (ms) under which a fraction `q` of the requests fell, to one histogram bucket."""
        if not self.requests:
            return None
        rank = max(1, math.ceil(q * self.requests))
        seen = 0
        for index, count in enumerate(self.histogram):
            seen += count
            if seen >= rank:
                bound = LATENCY_BOUNDS_MS[index] if index < len(LATENCY_BOUNDS_MS) else self.latency_max_ms
                return float(min(bound, self.latency_max_ms))
        return self.latency_max_ms

    def summary(self) -> dict:
        seconds = (self.end - self.start).total_seconds()
        return {
            "start": self.start,
            "end": self.end,
            "requests": self.requests,
            "items": self.items,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "cache_hit_ratio": self.cached_items / self.items if self.items else 0.0,
            "latency_ms": {
                "p50": self.percentile(0.5),
                "p95": self.percentile(0.95),
                "p99": self.percentile(0.99),
                "mean": self.latency_sum_ms / self.requests if self.requests else None,
                "max": self.latency_max_ms if self.requests else None,
            },
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "throughput_rps": self.requests / seconds if seconds > 0 else 0.0,
            "items_per_s": self.items / seconds if seconds > 0 else 0.0,
        }


@dataclass
class Aggregate:
    buckets: list[Stats]
    total: Stats


def _minute(moment: datetime, *, up: bool = False) -> int:
    seconds = moment.timestamp()
    return math.ceil(seconds / 60) if up else math.floor(seconds / 60)


def _moment(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


def _filters(statement, endpoint: str | None, model: str | None, tenant: str | None):
    if tenant is not None:
        statement = statement.where(TABLE.c.tenant == tenant)
    if endpoint is not None:
        statement = statement.where(TABLE.c.endpoint == endpoint)
    if model is not None:
        statement = statement.where(TABLE.c.model == model)
    return statement


async def aggregate(
    sessions: async_sessionmaker[AsyncSession],
    start: datetime,
    end: datetime,
    bucket: BucketSize,
    *,
    endpoint: str | None = None,
    model: str | None = None,
    tenant: str | None = None,
) -> Aggregate:
    """Stats per bucket (those with requests, in order) and over the window `[start, end)`, of one tenant's
    requests (None: every tenant's)."""
    first, last = _minute(start), _minute(end, up=True)
    width = MINUTES[bucket]
    index = (TABLE.c.minute // width).label("bucket")
    sums = [func.sum(TABLE.c[name]) for name in (*COUNTERS, "latency_sum_ms", *HISTOGRAM_COLUMNS)]
    statement = _filters(
        select(index, func.max(TABLE.c.latency_max_ms), *sums).where(TABLE.c.minute >= first, TABLE.c.minute < last),
        endpoint,
        model,
        tenant,
    )
    async with sessions() as session:
        rows = (await session.execute(statement.group_by(index).order_by(index))).all()
    total = Stats(_moment(first), _moment(last))
    buckets = []
    counters = len(COUNTERS)
    for row in rows:
        values = [value or 0 for value in row[2:]]
        begin = max(first, row[0] * width)
        stats = Stats(
            _moment(begin),
            _moment(min(last, row[0] * width + width)),
            latency_sum_ms=float(values[counters]),
            latency_max_ms=float(row[1] or 0.0),
            histogram=[int(v) for v in values[counters + 1 :]],
        )
        for name, value in zip(COUNTERS, values[:counters], strict=True):
            setattr(stats, name, int(value))
        buckets.append(stats)
        total.add(stats)
    return Aggregate(buckets, total)


async def count_items(
    sessions: async_sessionmaker[AsyncSession],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    tenant: str | None = None,
) -> dict[str, int]:
    """Items answered (failed requests answer none), by endpoint, at one-minute resolution, for one tenant (None:
    every tenant)."""
    statement = select(TABLE.c.endpoint, func.sum(TABLE.c["items"]))  # `.c.items` is the collection's method
    if since is not None:
        statement = statement.where(TABLE.c.minute >= _minute(since))
    if until is not None:
        statement = statement.where(TABLE.c.minute < _minute(until, up=True))
    async with sessions() as session:
        rows = (await session.execute(_filters(statement, None, model, tenant).group_by(TABLE.c.endpoint))).all()
    return {endpoint: int(total or 0) for endpoint, total in rows}


def default_window(now: datetime, span: timedelta = timedelta(hours=1)) -> tuple[datetime, datetime]:
    """The last `span` up to the current minute, excluded (still filling): the same for every call in a minute, so
    identical reports share a cache entry."""
    end = _moment(_minute(now))
    return end - span, end

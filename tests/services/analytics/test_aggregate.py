"""Rollups written by the record writer, read by the aggregation: exact counts, percentiles within one bucket."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.db import migrate
from server.db.analytics_models import RequestRecord
from server.db.session import create_engine, session_factory
from server.services.analytics.aggregate import aggregate, count_items
from server.services.records import RecordWriter
from server.services.records.store import BatchWrite, Record

BASE = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def request(
    minute: int,
    latency_ms: float,
    *,
    status: int = 200,
    endpoint: str = "generate",
    model: str = "gpt2",
    items: int = 1,
    cached: int = 0,
    record_id: str | None = None,
) -> dict:
    return {
        "id": record_id or uuid.uuid4().hex,
        "endpoint": endpoint,
        "model": model,
        "status": status,
        "error": None if status < 400 else "DeadlineExceeded",
        "items": 0 if status >= 400 else items,
        "cached_items": 0 if status >= 400 else cached,
        "tokens_in": 0 if status >= 400 else 3 * items,
        "tokens_out": 0 if status >= 400 else 5 * items,
        "latency_ms": latency_ms,
        "created_at": BASE + timedelta(minutes=minute, seconds=30),
    }


@pytest.fixture
async def sessions(database_url: str):
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url, timeout_s=5)
    yield session_factory(engine)
    await engine.dispose()


def writer(sessions, database_url: str, tmp_path: Path) -> RecordWriter:
    return RecordWriter(
        sessions,
        database_url=database_url,
        flush_interval_s=60,
        max_items=1000,
        spill_dir=tmp_path / "spill",
        timeout_s=5.0,
    )


async def test_counts_rates_and_percentiles(sessions, database_url, tmp_path):
    records = writer(sessions, database_url, tmp_path)
    # Hour 10: 100 requests, latencies 1..100 ms, 10 of them failed (504), 2 items each, one cached per request.
    first_hour = [
        request(i % 60, float(i), status=504 if i % 10 == 0 else 200, items=2, cached=1) for i in range(1, 101)
    ]
    # Hour 11: 4 predictions of 2 s.
    second_hour = [request(60 + i, 2000.0, endpoint="predict", model="sst2") for i in range(4)]
    records.add(RequestRecord, first_hour[:50])
    assert await records.flush()
    records.add(RequestRecord, first_hour[50:] + second_hour)  # the same minutes again: counts add up
    assert await records.flush()

    result = await aggregate(sessions, BASE, BASE + timedelta(hours=2), "hour")
    first, second = result.buckets
    assert (first.start, first.end) == (BASE, BASE + timedelta(hours=1))
    assert (first.requests, first.errors, first.items, first.cached_items) == (100, 10, 180, 90)
    summary = first.summary()
    assert summary["error_rate"] == pytest.approx(0.1)
    assert summary["cache_hit_ratio"] == pytest.approx(0.5)
    # True p50 = 50 ms, p95 = 95 ms, p99 = 99 ms; each is reported as its bucket's upper bound.
    assert summary["latency_ms"]["p50"] == 50
    assert summary["latency_ms"]["p95"] == 100
    assert summary["latency_ms"]["p99"] == 100
    assert summary["latency_ms"]["max"] == 100
    assert summary["latency_ms"]["mean"] == pytest.approx(50.5)
    assert (first.tokens_in, first.tokens_out) == (3 * 180, 5 * 180)
    assert summary["throughput_rps"] == pytest.approx(100 / 3600)
    assert (second.requests, second.errors, second.summary()["latency_ms"]["p50"]) == (4, 0, 2000)
    assert result.total.requests == 104 and result.total.summary()["latency_ms"]["p99"] == 2000

    only_predict = await aggregate(sessions, BASE, BASE + timedelta(hours=2), "minute", endpoint="predict")
    assert [bucket.requests for bucket in only_predict.buckets] == [1, 1, 1, 1]
    assert (await aggregate(sessions, BASE, BASE + timedelta(hours=2), "day", model="sst2")).total.requests == 4
    assert await count_items(sessions) == {"generate": 180, "predict": 4}
    assert await count_items(sessions, since=BASE + timedelta(hours=1)) == {"predict": 4}


async def test_a_record_written_twice_is_rolled_up_once(sessions, database_url, tmp_path):
    rows = [request(0, 10.0, record_id=f"r{i}") for i in range(3)]
    first = BatchWrite([Record(RequestRecord.__table__, row) for row in rows], chunk_size=10)
    await first.run(sessions, 5.0)
    replay = BatchWrite(
        [Record(RequestRecord.__table__, row) for row in rows + [request(0, 10.0, record_id="r3")]], chunk_size=10
    )
    await replay.run(sessions, 5.0)
    assert (replay.inserted, replay.present) == (1, 3)
    assert (await aggregate(sessions, BASE, BASE + timedelta(minutes=1), "minute")).total.requests == 4

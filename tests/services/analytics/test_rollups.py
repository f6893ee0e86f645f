"""Per-minute rollups of request records: grouped by (tenant, minute, endpoint, model), server errors only counted as
errors, each latency in its inclusive bucket, and a flush's counts added to what is stored."""

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from server.core.tenants import DEFAULT_TENANT
from server.db import migrate
from server.db.analytics_models import HISTOGRAM_COLUMNS, LATENCY_BOUNDS_MS, MetricRollup
from server.db.session import create_engine, session_factory
from server.services.analytics.rollups import add_to_rollups, bucket_of, epoch_minute, rollup_rows

MINUTE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def request(
    *,
    at: datetime = MINUTE,
    latency_ms: float = 10.0,
    status: int = 200,
    endpoint: str = "predict",
    model: str = "m",
    tenant: str | None = "t",
    items: int = 1,
    cached_items: int = 0,
    tokens_in: int = 0,
    tokens_out: int = 0,
) -> dict:
    row = {
        "endpoint": endpoint,
        "model": model,
        "status": status,
        "items": items,
        "cached_items": cached_items,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "latency_ms": latency_ms,
        "created_at": at,
    }
    return row if tenant is None else {**row, "tenant": tenant}


def histogram(row: dict) -> dict[int, int]:
    return {i: row[name] for i, name in enumerate(HISTOGRAM_COLUMNS) if row[name]}


@pytest.mark.parametrize(
    ("latency_ms", "bucket"),
    [
        (0.0, 0),
        (5.0, 0),
        (5.001, 1),
        (10.0, 1),
        (30000.0, len(LATENCY_BOUNDS_MS) - 1),
        (30000.5, len(LATENCY_BOUNDS_MS)),
    ],
)
def test_a_latency_falls_in_the_first_bucket_whose_bound_holds_it(latency_ms, bucket):
    assert bucket_of(latency_ms) == bucket


def test_the_minute_is_counted_from_the_epoch_whatever_the_offset():
    assert epoch_minute(MINUTE + timedelta(seconds=59)) == epoch_minute(MINUTE) == 28_488_240
    assert epoch_minute(MINUTE + timedelta(seconds=60)) == epoch_minute(MINUTE) + 1
    assert epoch_minute(MINUTE.astimezone(timezone(timedelta(hours=-5)))) == epoch_minute(MINUTE)


def test_requests_of_one_minute_endpoint_model_and_tenant_make_one_row_with_summed_counts():
    [row] = rollup_rows(
        [
            request(latency_ms=4.0, items=2, cached_items=1, tokens_in=3, tokens_out=5),
            request(at=MINUTE + timedelta(seconds=59), latency_ms=120.0, items=3, tokens_in=1, tokens_out=2),
        ]
    )
    assert {k: row[k] for k in ("tenant", "minute", "endpoint", "model")} == {
        "tenant": "t",
        "minute": epoch_minute(MINUTE),
        "endpoint": "predict",
        "model": "m",
    }
    assert (row["requests"], row["items"], row["cached_items"], row["tokens_in"], row["tokens_out"]) == (2, 5, 1, 4, 7)
    assert (row["latency_sum_ms"], row["latency_max_ms"]) == (124.0, 120.0)
    assert histogram(row) == {0: 1, bucket_of(120.0): 1}


def test_a_different_minute_endpoint_model_or_tenant_is_a_row_of_its_own():
    rows = rollup_rows(
        [
            request(),
            request(at=MINUTE + timedelta(minutes=1)),
            request(endpoint="generate"),
            request(model="other"),
            request(tenant="u"),
            request(),
        ]
    )
    assert len(rows) == 5 and sum(row["requests"] for row in rows) == 6


def test_only_server_errors_count_as_errors():
    [row] = rollup_rows([request(status=s) for s in (200, 400, 404, 422, 429, 499, 500, 503, 504)])
    assert (row["requests"], row["errors"]) == (9, 3)


def test_a_record_without_a_tenant_is_rolled_up_under_the_default_tenant():
    [row] = rollup_rows([request(tenant=None)])
    assert row["tenant"] == DEFAULT_TENANT


def test_no_records_make_no_rows():
    assert rollup_rows([]) == []


@pytest.fixture
async def sessions(database_url: str):
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url, timeout_s=5)
    yield session_factory(engine)
    await engine.dispose()


async def stored_rollups(sessions) -> list[dict]:
    async with sessions() as session:
        return [dict(row._mapping) for row in await session.execute(select(MetricRollup.__table__))]


async def test_a_flush_adds_its_counts_to_the_stored_rollup_and_keeps_the_larger_maximum(sessions):
    async with sessions() as session, session.begin():
        await add_to_rollups(session, [request(latency_ms=300.0, status=500), request(latency_ms=2.0)])
    async with sessions() as session, session.begin():
        await add_to_rollups(session, [request(latency_ms=40.0, items=4)])
    async with sessions() as session, session.begin():
        await add_to_rollups(session, [request(latency_ms=900.0, tenant="u")])
    rows = {row["tenant"]: row for row in await stored_rollups(sessions)}
    assert set(rows) == {"t", "u"}
    t = rows["t"]
    assert (t["requests"], t["items"], t["errors"]) == (3, 6, 1)
    assert (t["latency_sum_ms"], t["latency_max_ms"]) == (342.0, 300.0)
    assert histogram(t) == {bucket_of(2.0): 1, bucket_of(40.0): 1, bucket_of(300.0): 1}
    assert (rows["u"]["requests"], rows["u"]["latency_max_ms"]) == (1, 900.0)


async def test_a_rollup_written_in_a_transaction_that_rolls_back_is_not_kept(sessions):
    with pytest.raises(RuntimeError):
        async with sessions() as session, session.begin():
            await add_to_rollups(session, [request()])
            raise RuntimeError("the records insert failed")
    assert await stored_rollups(sessions) == []


async def test_adding_no_records_writes_nothing(sessions):
    async with sessions() as session, session.begin():
        await add_to_rollups(session, [])
    assert await stored_rollups(sessions) == []

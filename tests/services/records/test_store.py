"""The one place record rows are written: idempotent on the id, a rejected row isolated from its batch-mates, any
other failure stopping the write with exactly the unwritten rows kept, and each failure classified."""

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from server.db import migrate
from server.db.analytics_models import MetricRollup, RequestRecord
from server.db.models import GenerationRecord, PredictionRecord
from server.db.session import create_engine, session_factory
from server.services.records.store import REASON_MAX_CHARS, BatchWrite, Record, classify, describe, insert_records
from tests.support.servers import free_port

MOMENT = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)


def prediction(i: int, text: str | None = "text") -> Record:
    row = {
        "id": f"p{i}",
        "text": text,
        "label": "POSITIVE",
        "score": 0.9,
        "model": "m",
        "latency_ms": 1.0,
        "created_at": MOMENT,
    }
    return Record(PredictionRecord.__table__, row)


def generation(i: int) -> Record:
    row = {
        "id": f"g{i}",
        "prompt": "p",
        "generated_text": "p q",
        "completion": " q",
        "model": "m",
        "params": {},
        "finish_reason": "length",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "latency_ms": 1.0,
        "created_at": MOMENT,
    }
    return Record(GenerationRecord.__table__, row)


def request(i: int, latency_ms: float = 12.0) -> Record:
    row = {
        "id": f"r{i}",
        "tenant": "t",
        "endpoint": "predict",
        "model": "m",
        "status": 200,
        "error": None,
        "items": 2,
        "cached_items": 1,
        "tokens_in": 0,
        "tokens_out": 0,
        "latency_ms": latency_ms,
        "created_at": MOMENT,
    }
    return Record(RequestRecord.__table__, row)


@pytest.fixture
async def migrated(engine, database_url: str):
    await asyncio.to_thread(migrate.upgrade, database_url)
    return engine


async def ids(engine, table) -> list[str]:
    async with session_factory(engine)() as session:
        return sorted(await session.scalars(select(table.id)))


async def test_insert_records_returns_how_many_rows_were_new(migrated):
    sessions = session_factory(migrated)
    assert await insert_records(sessions, [prediction(1), prediction(2), generation(1)], 5) == 3
    assert await insert_records(sessions, [prediction(2), prediction(3), generation(1)], 5) == 1
    assert await ids(migrated, PredictionRecord) == ["p1", "p2", "p3"]
    assert await ids(migrated, GenerationRecord) == ["g1"]


async def test_a_row_already_stored_is_not_overwritten_by_a_second_write(migrated):
    sessions = session_factory(migrated)
    await insert_records(sessions, [prediction(1, "first")], 5)
    await insert_records(sessions, [prediction(1, "second")], 5)
    async with sessions() as session:
        assert list(await session.scalars(select(PredictionRecord.text))) == ["first"]


async def test_a_request_record_written_twice_is_rolled_up_once(migrated):
    sessions = session_factory(migrated)
    await insert_records(sessions, [request(1), request(2)], 5)
    await insert_records(sessions, [request(2), request(3)], 5)
    async with sessions() as session:
        [(requests, items, cached)] = (
            await session.execute(select(MetricRollup.requests, MetricRollup.items, MetricRollup.cached_items))
        ).all()
    assert (requests, items, cached) == (3, 6, 3)


async def test_a_batch_counts_new_and_already_present_rows_and_what_it_wrote_per_table(migrated):
    await insert_records(session_factory(migrated), [prediction(2)], 5)
    write = BatchWrite([prediction(0), prediction(1), prediction(2), generation(0), generation(1)], chunk_size=2)
    await write.run(session_factory(migrated), 5)
    assert (write.inserted, write.present) == (4, 1)
    assert write.written == {"predictions": 3, "generations": 2}
    assert write.remaining == [] and write.rejected == []
    assert await ids(migrated, PredictionRecord) == ["p0", "p1", "p2"]


async def test_an_empty_batch_writes_nothing_and_succeeds(migrated):
    write = BatchWrite([], chunk_size=10)
    await write.run(session_factory(migrated), 5)
    assert (write.inserted, write.present, write.remaining, write.rejected) == (0, 0, [], [])


async def test_rejected_rows_are_set_aside_with_their_reason_and_every_other_row_lands(migrated):
    bad = {1, 4, 9}
    records = [prediction(i, "lone surrogate \ud800" if i in bad else f"text {i}") for i in range(10)]
    write = BatchWrite(records, chunk_size=4)
    await write.run(session_factory(migrated), 5)
    assert [record.row["id"] for record, _ in write.rejected] == [f"p{i}" for i in sorted(bad)]
    assert all("surrogates not allowed" in reason for _, reason in write.rejected)
    assert await ids(migrated, PredictionRecord) == sorted(f"p{i}" for i in range(10) if i not in bad)
    assert (write.inserted, write.present, write.remaining) == (7, 0, [])
    assert write.written == {"predictions": 7}


async def test_a_row_breaking_a_constraint_is_rejected_with_a_short_reason_without_sql_or_values(migrated):
    write = BatchWrite([prediction(1), prediction(2, text=None), prediction(3)], chunk_size=3)
    await write.run(session_factory(migrated), 5)
    [(record, reason)] = write.rejected
    assert record.row["id"] == "p2"
    assert "null" in reason.lower()
    assert "\n" not in reason and len(reason) <= REASON_MAX_CHARS
    assert "INSERT" not in reason and "POSITIVE" not in reason
    assert await ids(migrated, PredictionRecord) == ["p1", "p3"]


async def test_a_failed_statement_stops_the_write_and_keeps_exactly_the_unwritten_rows(migrated):
    async with migrated.begin() as connection:
        await connection.execute(text("DROP TABLE generations"))
    records = [prediction(0), prediction(1), generation(0), generation(1), prediction(2)]
    write = BatchWrite(records, chunk_size=2)
    with pytest.raises(Exception) as failed:
        await write.run(session_factory(migrated), 5)
    assert classify(failed.value) in ("error", "unavailable")
    assert write.remaining == records[2:]
    assert (write.inserted, write.present, write.rejected) == (2, 0, [])
    assert write.written == {"predictions": 2}
    assert await ids(migrated, PredictionRecord) == ["p0", "p1"]


async def test_a_write_to_a_missing_table_is_an_error_not_an_unavailable_database(engine):
    """The module's docstring: `error` is "any other failure of the whole statement, e.g. a missing table" (SQLite
    raises the same exception class for it as for a locked file: its result code tells them apart)."""
    with pytest.raises(Exception) as failed:
        await insert_records(session_factory(engine), [prediction(1)], 5)
    assert classify(failed.value) == "error"


async def hold_the_rows(database_url: str) -> Callable[[], Awaitable[None]]:
    """Make another transaction hold what a write of `p1` needs (PostgreSQL: an uncommitted insert of the same id;
    SQLite: an exclusive lock on the file); returns what lets it go."""
    if database_url.startswith("sqlite"):
        blocker = sqlite3.connect(make_url(database_url).database, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")

        async def release_sqlite() -> None:
            blocker.close()

        return release_sqlite
    url = make_url(database_url)
    connection = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
    holding = connection.transaction()
    await holding.start()
    await connection.execute(
        "INSERT INTO predictions (id, tenant, text, label, score, model, latency_ms, created_at) "
        "VALUES ('p1', 'default', 'held', 'x', 0, 'm', 0, now())"
    )

    async def release_postgres() -> None:
        await holding.rollback()
        await connection.close()

    return release_postgres


async def test_a_write_held_beyond_its_timeout_is_a_timeout_and_keeps_every_row(migrated, database_url):
    records = [prediction(1), prediction(2)]
    release = await hold_the_rows(database_url)
    write = BatchWrite(records, chunk_size=10)
    try:
        with pytest.raises(Exception) as failed:
            await write.run(session_factory(migrated), 0.3)
    finally:
        await release()
    assert classify(failed.value) == "timeout"
    assert write.remaining == records and write.inserted == 0
    await write.run(session_factory(migrated), 5)
    assert write.inserted == 2 and await ids(migrated, PredictionRecord) == ["p1", "p2"]


async def test_a_database_that_cannot_be_reached_is_unavailable():
    engine = create_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none", timeout_s=2)
    try:
        with pytest.raises(Exception) as failed:
            await insert_records(session_factory(engine), [prediction(1)], 5)
    finally:
        await engine.dispose()
    assert classify(failed.value) == "unavailable"
    assert describe(failed.value)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "timeout"),
        (ValueError("a value the driver cannot encode"), "rejected"),
        (TypeError("not a str"), "rejected"),
        (ConnectionRefusedError(111, "refused"), "unavailable"),
        (RuntimeError("a bug"), "error"),
    ],
)
def test_failures_outside_the_database_driver_are_classified_by_their_kind(exc, reason):
    assert classify(exc) == reason


def test_a_timeout_behind_another_error_is_still_a_timeout():
    try:
        try:
            raise TimeoutError
        except TimeoutError as cause:
            raise RuntimeError("while writing") from cause
    except RuntimeError as exc:
        assert classify(exc) == "timeout"


def test_describe_keeps_the_first_line_and_bounds_its_length():
    assert describe(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert len(describe(ValueError("x" * 1000))) == REASON_MAX_CHARS
    assert describe(RuntimeError()) == "RuntimeError"

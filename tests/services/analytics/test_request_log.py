"""Request records: one per request, answered, failed (with the HTTP status its error is answered with) or refused
before the service, each marking the request as recorded."""

import asyncio
import time

import pytest
from sqlalchemy import select

from server.db import migrate
from server.db.analytics_models import RequestRecord
from server.db.session import create_engine, session_factory
from server.services.analytics.request_log import CLIENT_CLOSED, REQUEST_MARK, RequestLog, RequestMark, status_of
from server.services.errors import (
    BlockedPrompt,
    DeadlineExceeded,
    FieldError,
    InputError,
    ModelFailed,
    Overloaded,
)
from server.services.records import RecordWriter


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InputError([FieldError(("body", "texts", 0), "too long")]), 422),
        (BlockedPrompt(1), 400),
        (Overloaded("generator", 3), 503),
        (DeadlineExceeded(), 504),
        (ModelFailed("boom"), 500),
        (asyncio.CancelledError(), CLIENT_CLOSED),
        (RuntimeError("a bug"), 500),
        (ValueError("not a service error"), 500),
    ],
)
def test_a_failure_is_recorded_with_the_status_it_is_answered_with(exc, status):
    assert status_of(exc) == status


@pytest.fixture
async def recorded(tmp_path):
    """A record writer on a fresh SQLite database, and a function flushing it and returning the stored records."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    engine = create_engine(url, timeout_s=5)
    writer = RecordWriter(
        session_factory(engine), database_url=url, flush_interval_s=60, max_items=100, spill_dir=tmp_path / "spill"
    )

    async def stored() -> list[RequestRecord]:
        assert await writer.flush()
        async with session_factory(engine)() as session:
            return list(await session.scalars(select(RequestRecord).order_by(RequestRecord.pk)))

    yield writer, stored
    await engine.dispose()


async def test_an_answered_request_records_its_counts_and_latency(recorded):
    writer, stored = recorded
    log = RequestLog(writer, "generate", "tiny-gpt")
    started = time.perf_counter() - 0.25
    log.answered(started, "acme", items=3, cached_items=1, tokens_in=7, tokens_out=9)
    [record] = await stored()
    assert (record.tenant, record.endpoint, record.model, record.status, record.error) == (
        "acme",
        "generate",
        "tiny-gpt",
        200,
        None,
    )
    assert (record.items, record.cached_items, record.tokens_in, record.tokens_out) == (3, 1, 7, 9)
    assert record.latency_ms >= 250
    assert len(record.id) == 32


async def test_a_failed_request_records_its_status_and_error_and_no_items(recorded):
    writer, stored = recorded
    log = RequestLog(writer, "predict", "m")
    log.failed(time.perf_counter(), Overloaded("m", 1), "acme")
    log.failed(time.perf_counter(), asyncio.CancelledError(), "acme")
    records = await stored()
    assert [(r.status, r.error) for r in records] == [(503, "Overloaded"), (CLIENT_CLOSED, "CancelledError")]
    assert all((r.items, r.cached_items, r.tokens_in, r.tokens_out) == (0, 0, 0, 0) for r in records)


async def test_a_refused_request_is_named_by_why_it_was_refused(recorded):
    writer, stored = recorded
    log = RequestLog(writer, "predict", "m")
    for status in (401, 408, 413, 422, 429, 418):
        log.refused(time.perf_counter(), status, "acme")
    assert [(r.status, r.error) for r in await stored()] == [
        (401, "Unauthorized"),
        (408, "BodyTimeout"),
        (413, "BodyTooLarge"),
        (422, "InvalidRequest"),
        (429, "RateLimited"),
        (418, "HTTP418"),
    ]


async def test_each_record_gets_an_id_of_its_own(recorded):
    writer, stored = recorded
    log = RequestLog(writer, "predict", "m")
    for _ in range(5):
        log.answered(time.perf_counter(), "acme", items=1, cached_items=0)
    assert len({r.id for r in await stored()}) == 5


async def test_recording_marks_the_request_even_from_a_task_it_spawned(recorded):
    writer, _ = recorded
    log = RequestLog(writer, "predict", "m")
    mark = RequestMark()
    token = REQUEST_MARK.set(mark)

    async def handler_task() -> None:
        log.failed(time.perf_counter(), RuntimeError("x"), "acme")

    try:
        assert not mark.recorded
        await asyncio.create_task(handler_task())
        assert mark.recorded
    finally:
        REQUEST_MARK.reset(token)


async def test_recording_outside_an_http_request_needs_no_mark(recorded):
    writer, stored = recorded
    assert REQUEST_MARK.get() is None
    RequestLog(writer, "generate", "m").answered(time.perf_counter(), "acme", items=1, cached_items=0)
    assert len(await stored()) == 1

"""Replay of spill files, beyond the writer's own round trips (tests/services/records/test_writer.py): no row is
lost whatever goes wrong: an unreadable file, a database that fails or a cancelled replay keep the file whole
for a later replay; rows the database still refuses move to a rejected file."""

import asyncio
import logging
import os

import pytest
from sqlalchemy import func, select

from server.core.config import Settings
from server.db import migrate
from server.db.models import PredictionRecord
from server.db.session import create_engine, session_factory
from server.services.records.replay import replay_at_start, replay_now, replay_spill
from server.services.records.spill import database_identity, read_header, read_records, spill_files, write_spill
from server.services.records.store import Record
from tests.services.records.test_store import hold_the_rows, prediction
from tests.support.waiting import until


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Only what a replay reads: no models are loaded."""
    return Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'server.db'}",
        record_spill_dir=tmp_path / "spill",
        database_timeout_s=5,
    )


@pytest.fixture
async def migrated(engine, database_url: str):
    await asyncio.to_thread(migrate.upgrade, database_url)
    return engine


def spill(tmp_path, database_url: str, records: list[Record], kind="records", reason=None):
    entries = [(record, reason) for record in records]
    return write_spill(tmp_path / "spill", database_identity(database_url), kind, entries)


async def replay(engine, database_url, tmp_path, **options):
    return await replay_spill(
        session_factory(engine),
        tmp_path / "spill",
        database_identity(database_url),
        timeout_s=options.pop("timeout_s", 5.0),
        chunk_size=3,
        **options,
    )


async def stored(engine) -> list[str]:
    async with session_factory(engine)() as session:
        return sorted(await session.scalars(select(PredictionRecord.id)))


def files(tmp_path) -> list[str]:
    return sorted(path.name for path in (tmp_path / "spill").iterdir())


async def test_a_file_that_is_not_a_spill_file_is_reported_left_alone_and_the_others_are_replayed(
    migrated, database_url, tmp_path
):
    (tmp_path / "spill").mkdir()
    junk = tmp_path / "spill" / "records-00000000T000000Z-1-0000.jsonl"
    junk.write_text("not a spill file\n", encoding="utf-8")
    good = spill(tmp_path, database_url, [prediction(1)])
    reports = await replay(migrated, database_url, tmp_path)
    assert [report.path for report in reports] == [junk, good]
    assert reports[0].unreadable and "unreadable, left alone" in str(reports[0])
    assert reports[1].inserted == 1
    assert junk.read_text(encoding="utf-8") == "not a spill file\n"
    assert files(tmp_path) == [junk.name]
    assert await stored(migrated) == ["p1"]


async def test_a_file_with_a_malformed_row_is_given_back_whole_and_none_of_its_rows_are_written(
    migrated, database_url, tmp_path
):
    broken = spill(tmp_path, database_url, [prediction(1), prediction(2), prediction(3)])
    lines = broken.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"
    broken.write_text("".join(lines), encoding="utf-8")
    before = broken.read_bytes()
    later = spill(tmp_path, database_url, [prediction(4)])

    reports = await replay(migrated, database_url, tmp_path)
    [bad] = [report for report in reports if report.path == broken]
    assert [report.inserted for report in reports if report.path == later] == [1]
    assert bad.unreadable and "line 3" in bad.unreadable and bad.inserted == 0
    assert broken.read_bytes() == before, "the file is back under its own name, unchanged"
    assert await stored(migrated) == ["p4"], "a later file is still replayed"
    assert files(tmp_path) == [broken.name]


async def test_rows_the_database_still_refuses_move_to_a_rejected_file_and_the_rest_land(
    migrated, database_url, tmp_path
):
    source = spill(tmp_path, database_url, [prediction(i, "bad \ud800" if i == 2 else "ok") for i in range(5)])
    [report] = await replay(migrated, database_url, tmp_path)
    assert (report.inserted, report.present, report.rejected) == (4, 0, 1)
    assert report.rejected_to is not None and f"1 still rejected (now in {report.rejected_to})" in str(report)
    assert not source.exists()
    assert read_header(report.rejected_to)["database"] == database_identity(database_url)
    [kept] = read_records(report.rejected_to)
    assert kept.row["id"] == "p2" and kept.row["text"] == "bad \ud800"
    assert "surrogates not allowed" in report.rejected_to.read_text(encoding="utf-8")
    assert await stored(migrated) == ["p0", "p1", "p3", "p4"]
    assert await replay(migrated, database_url, tmp_path) == [], "a rejected file waits for --rejected"


async def test_a_failing_database_stops_the_replay_and_keeps_every_file(engine, database_url, tmp_path):
    first = spill(tmp_path, database_url, [prediction(1)])
    second = spill(tmp_path, database_url, [prediction(2)])
    reports = await replay(engine, database_url, tmp_path)
    assert len(reports) == 1, "later files would fail the same way: not tried"
    assert reports[0].path in (first, second)
    assert reports[0].failed and "kept for a later replay" in str(reports[0])
    assert files(tmp_path) == sorted([first.name, second.name])

    await asyncio.to_thread(migrate.upgrade, database_url)
    assert [report.inserted for report in await replay(engine, database_url, tmp_path)] == [1, 1]
    assert await stored(engine) == ["p1", "p2"] and files(tmp_path) == []


async def test_a_replay_cancelled_while_writing_gives_the_file_back(migrated, database_url, tmp_path):
    path = spill(tmp_path, database_url, [prediction(1), prediction(2)])
    release = await hold_the_rows(database_url)
    try:
        task = asyncio.create_task(replay(migrated, database_url, tmp_path, timeout_s=30.0))
        await until(lambda: not path.exists(), 5)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await release()
    assert files(tmp_path) == [path.name]
    assert [report.inserted for report in await replay(migrated, database_url, tmp_path)] == [2]


async def test_a_file_claimed_by_another_live_process_is_not_replayed(migrated, database_url, tmp_path):
    path = spill(tmp_path, database_url, [prediction(1)])
    claimed = path.with_name(f"{path.name}.claimed-{os.getppid()}")
    path.rename(claimed)
    assert await replay(migrated, database_url, tmp_path) == []
    assert claimed.exists() and await stored(migrated) == []


async def test_replay_at_start_never_fails_the_start_and_says_what_is_kept(settings, tmp_path, caplog):
    """The database has no tables yet: the records file stays, and the rejected rows are counted for the operator."""
    url = settings.database_url
    kept = write_spill(settings.record_spill_dir, database_identity(url), "records", [(prediction(1), None)])
    write_spill(
        settings.record_spill_dir,
        database_identity(url),
        "rejected",
        [(prediction(i), "refused") for i in (2, 3)],
    )
    write_spill(settings.record_spill_dir, database_identity(url), "rejected", [(prediction(4), "refused")])
    write_spill(settings.record_spill_dir, "sqlite+aiosqlite:////elsewhere.db", "rejected", [(prediction(5), "x")])
    engine = create_engine(url, timeout_s=5)
    try:
        with caplog.at_level(logging.INFO, logger="server.services.records.replay"):
            await replay_at_start(session_factory(engine), settings)
    finally:
        await engine.dispose()
    assert kept.exists()
    messages = [record.getMessage() for record in caplog.records]
    assert any("kept for a later replay" in message for message in messages)
    assert any(
        message.startswith("3 records the database rejected are kept in 2 files") and "--rejected" in message
        for message in messages
    )


async def test_replay_at_start_writes_this_databases_files_and_leaves_the_others(settings, tmp_path, caplog):
    url = settings.database_url
    await asyncio.to_thread(migrate.upgrade, url)
    mine = write_spill(settings.record_spill_dir, database_identity(url), "records", [(prediction(1), None)])
    other = write_spill(
        settings.record_spill_dir, "sqlite+aiosqlite:////elsewhere.db", "records", [(prediction(2), None)]
    )
    engine = create_engine(url, timeout_s=5)
    try:
        with caplog.at_level(logging.INFO, logger="server.services.records.replay"):
            await replay_at_start(session_factory(engine), settings)
        assert await stored(engine) == ["p1"]
    finally:
        await engine.dispose()
    assert not mine.exists() and other.exists()
    assert "1 spill files in" in caplog.text and "belong to other databases" in caplog.text
    assert "records the database rejected" not in caplog.text


async def test_replay_now_replays_rejected_files_only_when_asked(settings):
    url = settings.database_url
    await asyncio.to_thread(migrate.upgrade, url)
    write_spill(settings.record_spill_dir, database_identity(url), "records", [(prediction(1), None)])
    rejected = write_spill(settings.record_spill_dir, database_identity(url), "rejected", [(prediction(2), "fixed")])
    [report] = await replay_now(settings)
    assert report.inserted == 1 and rejected.exists()
    [report] = await replay_now(settings, kinds=("records", "rejected"))
    assert report.path == rejected and report.inserted == 1
    assert spill_files(settings.record_spill_dir, ("records", "rejected")) == []
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            assert await session.scalar(select(func.count()).select_from(PredictionRecord)) == 2
    finally:
        await engine.dispose()

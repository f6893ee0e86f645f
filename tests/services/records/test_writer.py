import asyncio
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, func, select

from server.core.config import PROJECT_ROOT
from server.db import migrate
from server.db.models import GenerationRecord, PredictionRecord
from server.db.session import create_engine, session_factory
from server.services.infra.health import records_check
from server.services.records import RecordWriter
from server.services.records.replay import replay_spill
from server.services.records.spill import database_identity, write_spill
from server.services.records.store import Record
from tests.support.waiting import until


def prediction(i: int, text: str | None = None) -> dict:
    return {
        "id": f"p{i}",
        "text": text or f"text {i}",
        "label": "POSITIVE",
        "score": 0.9,
        "model": "m",
        "latency_ms": 1.0,
        "created_at": datetime.now(UTC),
    }


def generation(i: int, prompt: str = "p") -> dict:
    return {
        "id": f"g{i}",
        "prompt": prompt,
        "generated_text": f"{prompt} q",
        "completion": " q",
        "model": "m",
        "params": {"max_new_tokens": 1},
        "finish_reason": "length",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "latency_ms": 1.0,
        "created_at": datetime.now(UTC),
    }


@pytest.fixture
async def engine(database_url: str):
    engine = create_engine(database_url, timeout_s=5)
    yield engine
    await engine.dispose()


def writer(engine, database_url: str, tmp_path: Path, interval_s: float = 60.0, **options) -> RecordWriter:
    options = {"max_items": 1000, "shutdown_timeout_s": 10.0, **options}
    return RecordWriter(
        session_factory(engine),
        database_url=database_url,
        flush_interval_s=interval_s,
        spill_dir=tmp_path / "spill",
        timeout_s=5.0,
        **options,
    )


async def count(engine, table) -> int:
    async with session_factory(engine)() as session:
        return await session.scalar(select(func.count()).select_from(table))


async def stored_ids(engine, table) -> list[str]:
    async with session_factory(engine)() as session:
        return list(await session.scalars(select(table.id)))


def spilled(tmp_path: Path, kind: str) -> list[dict]:
    """The row lines of every spill file of `kind`, each with its file's header under "header"."""
    lines = []
    for path in sorted((tmp_path / "spill").glob(f"{kind}-*.jsonl")):
        header, *rows = [json.loads(line) for line in path.read_text().splitlines()]
        lines.extend({**row, "header": header} for row in rows)
    return lines


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("record_write_failures_total", {"reason": reason}) or 0.0


async def test_rows_are_written_with_one_statement_per_table(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    inserts = []
    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: inserts.append(statement) if "INSERT" in statement else None,
    )
    records = writer(engine, database_url, tmp_path)
    records.add(PredictionRecord, [prediction(i) for i in range(40)])
    records.add(GenerationRecord, [generation(i) for i in range(30)])
    assert await records.flush()
    assert len(inserts) == 2
    assert await count(engine, PredictionRecord) == 40 and await count(engine, GenerationRecord) == 30


async def test_background_task_flushes_on_its_interval_and_close_flushes_the_rest(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    records = writer(engine, database_url, tmp_path, interval_s=0.02)
    records.start()
    records.add(PredictionRecord, [prediction(1)])

    async def written() -> bool:
        return await count(engine, PredictionRecord) == 1

    await until(written, 10, 0.02)
    records.flush_interval_s = 60
    await asyncio.sleep(0.05)
    records.add(PredictionRecord, [prediction(2), prediction(3)])
    await records.close()
    assert await count(engine, PredictionRecord) == 3 and records.pending == 0


async def test_a_failed_write_keeps_its_rows_and_a_retry_writes_them(engine, database_url, tmp_path):
    records = writer(engine, database_url, tmp_path)
    records.add(PredictionRecord, [prediction(i) for i in range(3)])
    assert not await records.flush()
    assert records.pending == 3
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert await records.flush()
    assert await count(engine, PredictionRecord) == 3


async def test_writing_a_row_twice_stores_it_once(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    records = writer(engine, database_url, tmp_path)
    records.add(PredictionRecord, [prediction(1), prediction(2)])
    assert await records.flush()
    records.add(PredictionRecord, [prediction(2), prediction(3)])
    assert await records.flush()
    assert sorted(await stored_ids(engine, PredictionRecord)) == ["p1", "p2", "p3"]


async def test_rows_that_cannot_be_written_at_shutdown_are_spilled_to_a_file_naming_the_database(
    engine, database_url, tmp_path, caplog
):
    records = writer(engine, database_url, tmp_path, interval_s=0.01)
    records.start()
    records.add(PredictionRecord, [prediction(i) for i in range(4)])
    with caplog.at_level(logging.ERROR, logger="server.services.records.writer"):
        await records.close()
    lines = spilled(tmp_path, "records")
    assert [line["row"]["id"] for line in lines] == ["p0", "p1", "p2", "p3"]
    assert {line["table"] for line in lines} == {"predictions"}
    assert {line["header"]["database"] for line in lines} == {database_identity(database_url)}
    [message] = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert message.startswith("4 records could not be written before shutdown (the database ")
    assert "replay-spill" in message


async def test_a_row_the_database_rejects_is_set_aside_and_the_others_land(engine, database_url, tmp_path):
    """100 rows, 3 with a NUL: PostgreSQL text cannot hold it, so those 3 go to the rejected file with their reason
    and the 97 others are written by the same flush; SQLite stores all 100 as they are."""
    await asyncio.to_thread(migrate.upgrade, database_url)
    postgres = database_url.startswith("postgresql")
    with_nul = {7, 50, 93}
    before = failures("rejected")
    records = writer(engine, database_url, tmp_path, max_items=40)
    records.add(PredictionRecord, [prediction(i, "bad \x00 text" if i in with_nul else None) for i in range(70)])
    records.add(GenerationRecord, [generation(i, "nul \x00" if i + 70 in with_nul else "p") for i in range(30)])
    assert await records.flush()
    stored = set(await stored_ids(engine, PredictionRecord)) | set(await stored_ids(engine, GenerationRecord))
    rejected = spilled(tmp_path, "rejected")
    expected_rejected = {f"p{i}" for i in with_nul if i < 70} | {f"g{i - 70}" for i in with_nul if i >= 70}
    assert {line["row"]["id"] for line in rejected} == (expected_rejected if postgres else set())
    assert stored | {line["row"]["id"] for line in rejected} == {f"p{i}" for i in range(70)} | {
        f"g{i}" for i in range(30)
    }
    assert len(stored) == (97 if postgres else 100) and records.pending == 0
    assert failures("rejected") - before == records.rejected == (3 if postgres else 0)
    if postgres:
        assert all("0x00" in line["reason"] for line in rejected)
        assert {line["row"]["text"] for line in rejected if line["table"] == "predictions"} == {"bad \x00 text"}
        records.add(PredictionRecord, [prediction(100)])
        assert await records.flush()
        assert "p100" in await stored_ids(engine, PredictionRecord)


async def test_a_row_no_backend_can_encode_is_set_aside_on_both(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    records = writer(engine, database_url, tmp_path)
    records.add(PredictionRecord, [prediction(1), prediction(2, "lone surrogate \ud800"), prediction(3)])
    assert await records.flush()
    assert sorted(await stored_ids(engine, PredictionRecord)) == ["p1", "p3"]
    [line] = spilled(tmp_path, "rejected")
    assert line["row"] == {**prediction(2, "lone surrogate \ud800"), "created_at": line["row"]["created_at"]}
    assert "surrogates not allowed" in line["reason"]


async def test_backoff_holds_when_a_full_buffer_keeps_waking_the_writer(engine, database_url, tmp_path):
    records = writer(engine, database_url, tmp_path, interval_s=5.0, max_items=10, shutdown_timeout_s=0.5)
    records.start()
    records.add(PredictionRecord, [prediction(j) for j in range(10)])
    # The first write has failed (no tables) before the others arrive, so that they all wake the writer in its
    # backoff: on a loaded machine, failing it (a first connection) can take longer than the loop below.
    await until(lambda: records.failures, 5)
    for i in range(1, 50):
        records.add(PredictionRecord, [prediction(i * 10 + j) for j in range(10)])
        await asyncio.sleep(0.005)
    attempts = sum(records.failures.values())
    await records.close()
    assert attempts == 1
    assert len(spilled(tmp_path, "records")) == 500


async def test_failure_warnings_are_throttled(engine, database_url, tmp_path, caplog):
    records = writer(engine, database_url, tmp_path)
    records.add(PredictionRecord, [prediction(1)])
    with caplog.at_level(logging.WARNING, logger="server.services.records.writer"):
        for _ in range(20):
            assert not await records.flush()
    assert sum(records.failures.values()) == 20
    assert len([r for r in caplog.records if "writing records failed" in r.getMessage()]) == 1


async def test_rows_past_the_buffer_bound_are_spilled_and_written_once_the_database_is_back(
    engine, database_url, tmp_path
):
    records = writer(engine, database_url, tmp_path, interval_s=0.02, buffer_max=5)
    for i in range(3):
        records.add(PredictionRecord, [prediction(i * 4 + j) for j in range(4)])
    assert records.pending == 5
    for _ in range(200):
        if len(spilled(tmp_path, "records")) == 7:
            break
        await asyncio.sleep(0.01)
    assert sorted(line["row"]["id"] for line in spilled(tmp_path, "records")) == sorted(f"p{i}" for i in range(5, 12))
    assert records.status().spilled == 7
    await asyncio.to_thread(migrate.upgrade, database_url)
    records.start()
    for _ in range(200):
        if await count(engine, PredictionRecord) == 12 and not spilled(tmp_path, "records"):
            break
        await asyncio.sleep(0.02)
    await records.close()
    assert sorted(await stored_ids(engine, PredictionRecord)) == sorted(f"p{i}" for i in range(12))
    assert not spilled(tmp_path, "records")


async def spill_while_down(engine, database_url, tmp_path, rows: list[dict]) -> None:
    records = writer(engine, database_url, tmp_path, interval_s=0.01)
    records.add(PredictionRecord, rows)
    await records.close()


async def replay(engine, database_url, tmp_path, **options):
    return await replay_spill(
        session_factory(engine),
        tmp_path / "spill",
        database_identity(database_url),
        timeout_s=5.0,
        chunk_size=3,
        **options,
    )


async def test_replay_writes_each_row_once_and_removes_its_file(engine, database_url, tmp_path):
    await spill_while_down(engine, database_url, tmp_path, [prediction(i) for i in range(5)])
    [spill_file] = (tmp_path / "spill").glob("records-*.jsonl")
    copy = tmp_path / "copy.jsonl"
    shutil.copy(spill_file, copy)
    await asyncio.to_thread(migrate.upgrade, database_url)
    async with session_factory(engine)() as session, session.begin():
        session.add(PredictionRecord(**prediction(0)))

    [report] = await replay(engine, database_url, tmp_path)
    assert (report.inserted, report.present, report.rejected) == (4, 1, 0)
    assert not spill_file.exists()
    shutil.copy(copy, spill_file)
    [again] = await replay(engine, database_url, tmp_path)
    assert (again.inserted, again.present) == (0, 5)
    assert sorted(await stored_ids(engine, PredictionRecord)) == [f"p{i}" for i in range(5)]
    assert await replay(engine, database_url, tmp_path) == []


async def test_replay_leaves_the_files_of_another_database_alone(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    other = write_spill(
        tmp_path / "spill",
        "postgresql+asyncpg://app:***@elsewhere/db",
        "records",
        [(Record(PredictionRecord.__table__, prediction(1)), None)],
    )
    [report] = await replay(engine, database_url, tmp_path)
    assert report.other_database == "postgresql+asyncpg://app:***@elsewhere/db" and "left alone" in str(report)
    assert other.exists() and await count(engine, PredictionRecord) == 0


async def test_replay_keeps_the_file_when_the_database_fails(engine, database_url, tmp_path):
    await spill_while_down(engine, database_url, tmp_path, [prediction(i) for i in range(2)])
    [spill_file] = (tmp_path / "spill").glob("records-*.jsonl")
    [report] = await replay(engine, database_url, tmp_path)
    assert report.failed and report.inserted == 0
    assert spill_file.exists()


async def test_concurrent_replays_claim_each_file_once_and_a_dead_claim_is_taken_over(engine, database_url, tmp_path):
    for n in range(3):
        await spill_while_down(engine, database_url, tmp_path, [prediction(n * 10 + i) for i in range(4)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = sorted((tmp_path / "spill").glob("records-*.jsonl"))
    files[0].rename(files[0].with_name(f"{files[0].name}.claimed-{dead.pid}"))
    await asyncio.to_thread(migrate.upgrade, database_url)
    reports = [
        r for rs in await asyncio.gather(*(replay(engine, database_url, tmp_path) for _ in range(3))) for r in rs
    ]
    assert sorted(r.path.name for r in reports) == [path.name for path in files]
    assert sum(r.inserted for r in reports) == 12 and sum(r.present for r in reports) == 0
    assert await count(engine, PredictionRecord) == 12
    assert not list((tmp_path / "spill").iterdir())


async def test_rejected_rows_are_replayed_only_on_request(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    write_spill(
        tmp_path / "spill",
        database_identity(database_url),
        "rejected",
        [(Record(PredictionRecord.__table__, prediction(1)), "a reason since fixed")],
    )
    assert await replay(engine, database_url, tmp_path) == []
    [report] = await replay(engine, database_url, tmp_path, kinds=("records", "rejected"))
    assert report.inserted == 1 and await count(engine, PredictionRecord) == 1
    assert not list((tmp_path / "spill").iterdir())


def test_the_replay_command_writes_the_spilled_rows_and_prints_each_file(tmp_path):
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    migrate.upgrade(database_url)
    path = write_spill(
        tmp_path / "spill",
        database_identity(database_url),
        "records",
        [(Record(PredictionRecord.__table__, prediction(i)), None) for i in range(3)],
    )
    write_spill(
        tmp_path / "spill",
        "sqlite+aiosqlite:////elsewhere.db",
        "records",
        [(Record(PredictionRecord.__table__, prediction(9)), None)],
    )
    env = {**os.environ, "DATABASE_URL": database_url, "RECORD_SPILL_DIR": str(tmp_path / "spill")}
    result = subprocess.run(
        [sys.executable, "-m", "server", "db", "replay-spill"],
        cwd=PROJECT_ROOT,
        timeout=120,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"{path}: 3 replayed, 0 already present" in result.stdout
    assert "left alone, it belongs to sqlite+aiosqlite:////elsewhere.db" in result.stdout
    assert sqlite3.connect(tmp_path / "cli.db").execute("SELECT count(*) FROM predictions").fetchone() == (3,)
    assert not path.exists()


async def test_records_health_is_degraded_while_writes_fail_or_the_backlog_does_not_shrink(
    engine, database_url, tmp_path
):
    records = writer(engine, database_url, tmp_path, max_items=5)
    records.add(PredictionRecord, [prediction(1)])
    assert records_check(records).status == "ok"
    assert not await records.flush()
    check = records_check(records)
    assert check.status == "degraded"
    assert check.detail["pending"] == 1 and check.detail["last_error"]
    assert sum(check.detail["failures_by_reason"].values()) == 1

    await asyncio.to_thread(migrate.upgrade, database_url)
    arrivals = iter([[prediction(i) for i in range(10, 20)]])

    def rows_arrive_during_the_write(*_):
        for rows in arrivals:
            records.add(PredictionRecord, rows)

    event.listen(engine.sync_engine, "before_cursor_execute", rows_arrive_during_the_write)
    assert await records.flush()
    assert records_check(records).status == "degraded" and records_check(records).detail["pending"] == 10
    assert await records.flush()
    check = records_check(records)
    assert check.status == "ok" and check.detail["pending"] == 0 and check.detail["last_error"]


async def test_an_unexpected_error_in_the_background_task_restarts_it_and_health_says_so(
    engine, database_url, tmp_path, caplog
):
    await asyncio.to_thread(migrate.upgrade, database_url)
    records = writer(engine, database_url, tmp_path, interval_s=0.02)
    flush, broken = records.flush, asyncio.Event()

    async def flush_with_a_bug() -> bool:
        broken.set()
        raise RuntimeError("a bug in the writer")

    records.flush = flush_with_a_bug
    before = REGISTRY.get_sample_value("background_task_failures_total", {"task": "record-writer"}) or 0.0
    records.start()
    records.add(PredictionRecord, [prediction(1)])
    await asyncio.wait_for(broken.wait(), 5)
    await asyncio.sleep(0)
    check = records_check(records)
    assert check.status == "degraded" and check.detail["task"]["state"] == "restarting"
    assert "a bug in the writer" in check.detail["task"]["last_error"]
    assert "Traceback" in caplog.text
    records.flush = flush
    for _ in range(200):
        if await count(engine, PredictionRecord) == 1:
            break
        await asyncio.sleep(0.02)
    assert await count(engine, PredictionRecord) == 1, "the restarted task writes the rows the failed one held"
    assert records_check(records).status == "ok"
    assert REGISTRY.get_sample_value("background_task_failures_total", {"task": "record-writer"}) - before == 1
    await records.close()

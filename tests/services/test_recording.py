import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from server.db import migrate
from server.db.models import GenerationRecord, PredictionRecord
from server.db.session import create_engine, session_factory
from server.services.recording import RecordWriter


def prediction(i: int) -> dict:
    return {"id": f"p{i}", "text": f"text {i}", "label": "POSITIVE", "score": 0.9, "model": "m", "latency_ms": 1.0,
            "created_at": datetime.now(UTC)}


def generation(i: int) -> dict:
    return {"id": f"g{i}", "prompt": "p", "generated_text": "p q", "completion": " q", "model": "m",
            "params": {"max_new_tokens": 1}, "finish_reason": "length", "prompt_tokens": 1, "completion_tokens": 1,
            "latency_ms": 1.0, "created_at": datetime.now(UTC)}


@pytest.fixture
async def engine(database_url: str):
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


def writer(engine, tmp_path: Path, interval_s: float = 60.0) -> RecordWriter:
    return RecordWriter(session_factory(engine), flush_interval_s=interval_s, max_items=1000,
                        spill_dir=tmp_path / "spill")


async def count(engine, table) -> int:
    async with session_factory(engine)() as session:
        return await session.scalar(select(func.count()).select_from(table))


async def test_rows_are_written_with_one_statement_per_table(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    inserts = []
    event.listen(engine.sync_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: inserts.append(statement) if "INSERT" in statement else None)
    records = writer(engine, tmp_path)
    records.add(PredictionRecord, [prediction(i) for i in range(40)])
    records.add(GenerationRecord, [generation(i) for i in range(30)])
    assert await records.flush()
    assert len(inserts) == 2
    assert await count(engine, PredictionRecord) == 40 and await count(engine, GenerationRecord) == 30


async def test_background_task_flushes_on_its_interval_and_close_flushes_the_rest(engine, database_url, tmp_path):
    await asyncio.to_thread(migrate.upgrade, database_url)
    records = writer(engine, tmp_path, interval_s=0.02)
    records.start()
    records.add(PredictionRecord, [prediction(1)])
    for _ in range(100):
        if await count(engine, PredictionRecord) == 1:
            break
        await asyncio.sleep(0.02)
    assert await count(engine, PredictionRecord) == 1
    records.flush_interval_s = 60
    await asyncio.sleep(0.05)
    records.add(PredictionRecord, [prediction(2), prediction(3)])
    await records.close()
    assert await count(engine, PredictionRecord) == 3 and records.pending == 0


async def test_a_failed_write_keeps_its_rows_and_a_retry_writes_them(engine, database_url, tmp_path):
    records = writer(engine, tmp_path)
    records.add(PredictionRecord, [prediction(i) for i in range(3)])
    assert not await records.flush()
    assert records.pending == 3
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert await records.flush()
    assert await count(engine, PredictionRecord) == 3


async def test_rows_that_cannot_be_written_at_shutdown_are_spilled_to_a_file(engine, tmp_path):
    records = writer(engine, tmp_path, interval_s=0.01)
    records.start()
    records.add(PredictionRecord, [prediction(i) for i in range(4)])
    await records.close()
    [spill] = list((tmp_path / "spill").iterdir())
    lines = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [line["row"]["id"] for line in lines] == ["p0", "p1", "p2", "p3"]
    assert {line["table"] for line in lines} == {"predictions"}

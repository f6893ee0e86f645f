"""A hung PostgreSQL (every process of the cluster SIGSTOPped): record writes time out instead of hanging, shutdown
keeps its bound and spills what is pending, and the next start writes it back, each row exactly once.

Each test has a PostgreSQL of its own, so the session's shared one is never stopped; a `finally` always resumes it.
"""

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from server.bench.run import server_process
from server.db import migrate
from server.db.models import PredictionRecord
from server.db.session import create_engine, session_factory
from server.services.records import RecordWriter
from tests.conftest import _create_database
from tests.support.servers import PostgresServer, free_port

pytestmark = pytest.mark.postgres
DATABASE_TIMEOUT_S = 1
SHUTDOWN_TIMEOUT_S = 3
# Stopping uvicorn, the batchers and the interpreter, on a loaded 2-core machine: generous on purpose.
EXIT_MARGIN_S = 20


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        _signal_cluster(server, signal.SIGCONT)
        server.destroy()


def _cluster_pids(server: PostgresServer) -> list[int]:
    """The postmaster and every process it forked (backends, checkpointer, ...)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


def _signal_cluster(server: PostgresServer, signum: int) -> None:
    for pid in _cluster_pids(server):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@contextmanager
def hung(server: PostgresServer) -> Iterator[None]:
    _signal_cluster(server, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_cluster(server, signal.SIGCONT)


async def database(server: PostgresServer, name: str) -> str:
    await _create_database(server, name)
    await asyncio.to_thread(migrate.upgrade, server.url(name))
    return server.url(name)


async def stored(url: str) -> Counter[str]:
    engine = create_engine(url, timeout_s=10)
    try:
        async with session_factory(engine)() as session:
            return Counter(await session.scalars(select(PredictionRecord.id)))
    finally:
        await engine.dispose()


def spilled_ids(spill_dir: Path) -> set[str]:
    ids = set()
    for path in spill_dir.glob("records-*.jsonl"):
        ids.update(json.loads(line)["row"]["id"] for line in path.read_text().splitlines()[1:])
    return ids


def row(i: int) -> dict:
    return {
        "id": f"p{i}",
        "text": f"text {i}",
        "label": "POSITIVE",
        "score": 0.9,
        "model": "m",
        "latency_ms": 1.0,
        "created_at": datetime.now(UTC),
    }


async def test_a_write_to_a_hung_database_times_out_and_close_spills_within_its_bound(own_postgres, tmp_path):
    url = await database(own_postgres, "writer")
    engine = create_engine(url, timeout_s=DATABASE_TIMEOUT_S)
    records = RecordWriter(
        session_factory(engine),
        database_url=url,
        flush_interval_s=60,
        max_items=100,
        spill_dir=tmp_path / "spill",
        timeout_s=DATABASE_TIMEOUT_S,
        shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
    )
    records.add(PredictionRecord, [row(i) for i in range(5)])
    assert await records.flush()
    try:
        with hung(own_postgres):
            records.add(PredictionRecord, [row(i) for i in range(5, 10)])
            assert not await records.flush()
            assert records.failures == {"timeout": 1} and records.status().degraded
            started = time.monotonic()
            await records.close()
            closed_in = time.monotonic() - started
            assert spilled_ids(tmp_path / "spill") == {f"p{i}" for i in range(5, 10)}
    finally:
        await engine.dispose()
    assert closed_in < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    assert set(await stored(url)) | spilled_ids(tmp_path / "spill") == {f"p{i}" for i in range(10)}


def predict(client: httpx.Client, base_url: str, texts: range) -> list[str]:
    """The ids of the answered requests (every one is expected to be answered)."""
    ids = []
    for i in texts:
        response = client.post(f"{base_url}/predict", json={"text": f"record number {i}"})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


async def test_sigterm_with_a_hung_database_spills_within_the_bound_and_the_restart_writes_each_row_once(
    own_postgres, standins, tmp_path
):
    url = await database(own_postgres, "faults")
    generator, classifier = standins
    spill_dir = tmp_path / "spill"
    env = {
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "DATABASE_URL": url,
        "DATABASE_TIMEOUT_S": str(DATABASE_TIMEOUT_S),
        "SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
        "RECORD_SPILL_DIR": str(spill_dir),
        "TORCH_NUM_THREADS": "1",
        "INGRESS_RATE_LIMIT": "off",
        "LOG_LEVEL": "info",
    }
    port = free_port()
    command = [sys.executable, "-m", "server", "serve", "--port", str(port)]
    with server_process(command, env, port, tmp_path / "first.log") as (base_url, process):
        with httpx.Client(timeout=60) as client:
            answered = predict(client, base_url, range(20))
        for _ in range(100):
            if set(answered) <= set(await stored(url)):
                break
            await asyncio.sleep(0.1)
        with hung(own_postgres):
            with httpx.Client(timeout=60) as client:
                answered += predict(client, base_url, range(20, 40))
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
            exited_in = time.monotonic() - started
            on_disk = spilled_ids(spill_dir)
    assert exited_in < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    assert on_disk and set(answered) <= set(await stored(url)) | on_disk
    log = (tmp_path / "first.log").read_text()
    assert "could not be written before shutdown" in log and "did not answer within 1 s" in log

    with server_process(command, env, port, tmp_path / "second.log"):
        counts = await stored(url)
    assert {id_: counts[id_] for id_ in answered} == dict.fromkeys(answered, 1)
    assert not spilled_ids(spill_dir)

"""Starting and stopping real processes: bad settings, several processes on a fresh database, bounded shutdown."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from server.core.config import PROJECT_ROOT
from server.db.migrate import alembic_config
from server.db.session import create_engine
from tests.support.servers import free_port, start_server

BAD_SETTINGS = {"INGRESS_RATE_LIMIT": "5/min", "PORT": "abc", "MODEL_SOURCE": "foo", "EGRESS_RATE_LIMIT": "garbage"}


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "server", "serve"], [sys.executable, "-m", "uvicorn", "server.main:app", "--port", "1"]],
    ids=["python -m server serve", "uvicorn"],
)
def test_bad_settings_stop_the_start_with_one_line_each_and_exit_status_2(command):
    result = run(command, **BAD_SETTINGS)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("invalid setting ")]
    assert len(lines) == len(BAD_SETTINGS) == len(result.stderr.strip().splitlines())
    for name, value in BAD_SETTINGS.items():
        [line] = [line for line in lines if line.startswith(f"invalid setting {name}={value!r}: ")]
        assert "expected" in line


def head_revision(url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


async def current_revision(url: str) -> str:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    finally:
        await engine.dispose()


# Each process imports everything first, then all call upgrade() at one wall-clock instant: the race that made
# all but one of them fail ("table already exists", UniqueViolationError) when nothing serialised migrations.
UPGRADE_AT = (
    "import sys, time; from server.db.migrate import upgrade; "
    "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); upgrade(sys.argv[2])"
)


@pytest.mark.parametrize("processes", [2, 4])
def test_upgrades_started_at_the_same_instant_on_a_fresh_database_all_succeed(database_url, processes):
    start_at = time.time() + 4
    running = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADE_AT, str(start_at), database_url],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(processes)
    ]
    outcomes = [(process.wait(120), process.stdout.read()) for process in running]
    assert [status for status, _ in outcomes] == [0] * processes, [output for _, output in outcomes]
    assert asyncio.run(current_revision(database_url)) == head_revision(database_url)


def test_servers_started_together_on_a_fresh_database_all_come_up(standins, database_url, tmp_path: Path):
    generator, classifier = standins
    env = {
        **os.environ,
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "DATABASE_URL": database_url,
        "RECORD_SPILL_DIR": str(tmp_path / "spill"),
        "TORCH_NUM_THREADS": "1",
        "LOG_LEVEL": "warning",
        "BATCH_WORKER": "off",
    }
    ports = [free_port() for _ in range(4)]
    with ExitStack() as stack:
        processes = []
        for port in ports:
            log = stack.enter_context((tmp_path / f"{port}.log").open("w"))
            process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--port", str(port)],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(process.wait, 30)
            stack.callback(process.terminate)
            processes.append(process)
        waiting = set(ports)
        deadline = time.monotonic() + 240
        while waiting and time.monotonic() < deadline and all(p.poll() is None for p in processes):
            for port in list(waiting):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        waiting.discard(port)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        logs = {port: (tmp_path / f"{port}.log").read_text() for port in ports}
        assert [p.poll() for p in processes] == [None] * 4, logs
        assert not waiting, logs
    assert asyncio.run(current_revision(database_url)) == head_revision(database_url)


def test_past_max_connections_a_new_request_is_refused_at_once(standins, tmp_path):
    process, port = start_server(standins, tmp_path, MAX_CONNECTIONS="3")
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        refused = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        for connection in idle:
            connection.close()
        for _ in range(100):
            # The server notices the closed connections on its own schedule.
            if (admitted := httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)).status_code == 200:
                break
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(30)
    assert refused.status_code == 503 and admitted.status_code == 200

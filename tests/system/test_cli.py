import inspect
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from server.core.config import PROJECT_ROOT


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_build_offline_writes_both_stand_ins(tmp_path):
    result = cli("models", "build-offline", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for kind in ("generator", "classifier"):
        assert (tmp_path / kind / "offline_standin.json").exists()
        assert (tmp_path / kind / "model.safetensors").exists()


def test_db_upgrade_creates_the_tables(tmp_path):
    database = tmp_path / "nested" / "cli.db"
    result = cli("db", "upgrade", DATABASE_URL=f"sqlite+aiosqlite:///{database}")
    assert result.returncode == 0, result.stderr
    tables = {row[0] for row in sqlite3.connect(database).execute("SELECT name FROM sqlite_master")}
    assert {"generations", "predictions", "alembic_version"} <= tables


def test_models_fetch_without_the_hub_fails_with_a_message(tmp_path):
    result = cli("models", "fetch", MODELS_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1", GENERATOR_MODEL="org/absent")
    assert result.returncode == 1
    assert "could not fetch org/absent" in result.stderr


def test_batch_run_once_runs_a_due_local_job_and_exits(tmp_path, standins):
    import asyncio

    from server.db.session import create_engine, session_factory
    from server.services.offload.jobs import JobSpec, JobStore, NewItem

    database = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    assert cli("db", "upgrade", DATABASE_URL=database).returncode == 0

    async def create_job() -> str:
        engine = create_engine(database)
        try:
            job = await JobStore(session_factory(engine)).create(
                JobSpec(name="cron", provider="local", model="gpt2", kind="generate", schedule="now"),
                [NewItem("a", {"prompt": "The cat", "max_tokens": 3})],
            )
        finally:
            await engine.dispose()
        return job.id

    job_id = asyncio.run(create_job())
    generator, classifier = standins
    result = cli(
        "batch",
        "run-once",
        DATABASE_URL=database,
        GENERATOR_MODEL=str(generator),
        SENTIMENT_MODEL=str(classifier),
        MODEL_SOURCE="local",
        RECORD_SPILL_DIR=str(tmp_path / "spill"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["submitted_jobs"] == 1 and report["finished_jobs"] == [job_id]


HEAVY_MODULES = {"torch", "transformers", "fastapi", "uvicorn", "sqlalchemy"}


def imported_modules(importtime_report: str) -> set[str]:
    """Top-level names from `python -X importtime` lines ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in importtime_report.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["db", "--help"], ["models", "build-offline", "-h"]])
def test_help_imports_no_heavy_module(args):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "server", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m server")
    modules = imported_modules(result.stderr)
    assert "argparse" in modules and not modules & HEAVY_MODULES, modules & HEAVY_MODULES


def test_bench_help_still_lists_the_bench_options():
    result = cli("bench", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout and "--concurrency" in result.stdout


def test_serve_hands_the_http_settings_to_uvicorn(monkeypatch):
    import uvicorn

    from server.__main__ import parser, serve
    from server.core.config import get_settings

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    for name, value in {
        "SHUTDOWN_TIMEOUT_S": "7",
        "KEEP_ALIVE_TIMEOUT_S": "9",
        "MAX_CONNECTIONS": "50",
        "HTTP_PARSER": "h11",
        "MAX_HEADER_BYTES": "8192",
        "LOG_FORMAT": "json",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        serve(parser(["serve"]).parse_args(["serve", "--port", "8123"]))
    finally:
        get_settings.cache_clear()
    [(app, options)] = calls
    assert (
        options["timeout_graceful_shutdown"],
        options["timeout_keep_alive"],
        options["limit_concurrency"],
        options["http"],
        options["h11_max_incomplete_event_size"],
        options["port"],
    ) == (8, 9, 50, "h11", 8192, 8123)
    assert options["access_log"] is False
    assert options["log_config"]["formatters"]["default"]["()"].__name__ == "JsonFormatter"
    assert app == "server.main:app" and set(options) <= set(inspect.signature(uvicorn.Config).parameters)


def test_serve_on_a_taken_port_fails_at_once_with_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli(
            "serve", "--port", str(taken.getsockname()[1]), DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/x.db"
        )
    assert result.returncode == 1 and "cannot listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.db").exists(), "nothing was loaded or migrated"

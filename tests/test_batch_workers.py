"""Batch workers as real processes (`python -m server worker`) against one database and one fake provider:
a worker killed between the provider's accepting a batch and its recording it does not submit it twice, and
two workers running at once submit every item exactly once."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from server.core.config import PROJECT_ROOT
from server.db import migrate
from server.db.batch_models import BatchJob, ProviderBatch
from server.db.session import create_engine, session_factory
from server.services.batch.jobs import JobSpec, JobStore, NewItem
from tests.fakes import FakeOpenAI
from tests.fakes.openai_batch import ENDPOINTS

DEADLINE_S = 120


@contextmanager
def worker(env: dict[str, str], log: Path):
    with log.open("a") as out:
        process = subprocess.Popen([sys.executable, "-m", "server", "worker"], cwd=PROJECT_ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(30)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


async def create_job(database_url: str, items: int) -> str:
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    try:
        job = await JobStore(session_factory(engine)).create(
            JobSpec(name="workers", provider="openai", model="gpt-4o-mini", kind="chat", schedule="now"),
            [NewItem(f"c{i:05d}", {"messages": [{"role": "user", "content": f"item {i}"}]}) for i in range(items)])
    finally:
        await engine.dispose()
    return job.id


def read(database_url: str, query):
    async def run():
        engine = create_engine(database_url)
        try:
            async with session_factory(engine)() as session:
                return (await session.execute(query)).all()
        finally:
            await engine.dispose()

    return asyncio.run(run())


def environment(standins, database_url: str, fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    generator, classifier = standins
    return {"GENERATOR_MODEL": str(generator), "SENTIMENT_MODEL": str(classifier), "MODEL_SOURCE": "local",
            "DATABASE_URL": database_url, "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": f"{fake.base_url}/v1",
            "BATCH_POLL_INTERVAL_S": "0.2", "TORCH_NUM_THREADS": "1", "LOG_LEVEL": "warning",
            "EGRESS_RATE_LIMIT": "", **extra}


def job_status(database_url: str, job_id: str) -> str:
    return read(database_url, select(BatchJob.status).where(BatchJob.id == job_id))[0][0]


def fresh_database(request: pytest.FixtureRequest, backend: str, tmp_path: Path, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / name}.db"
    from tests.conftest import _create_database

    postgres = request.getfixturevalue("postgres")
    asyncio.run(_create_database(postgres, name))
    return postgres.url(name)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_worker_killed_after_the_provider_accepted_a_batch_does_not_submit_it_again(request, backend, standins,
                                                                                      tmp_path):
    database = fresh_database(request, backend, tmp_path, "crash")
    job_id = asyncio.run(create_job(database, 5))
    with FakeOpenAI().serve() as fake:
        fake.settings.answer_create_after_s = 60
        env = environment(standins, database, fake, BATCH_LEASE_TTL_S="1")
        with worker(env, tmp_path / "first.log") as first:
            wait_until(lambda: fake.batches_created == 1, "the provider to accept the batch")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        [(status, provider_id)] = read(database, select(ProviderBatch.status, ProviderBatch.provider_batch_id))
        assert (status, provider_id) == ("submitting", None)
        fake.settings.answer_create_after_s = 0
        with worker(env, tmp_path / "second.log"):
            wait_until(lambda: job_status(database, job_id) == "completed", "the job to complete")
        assert fake.batches_created == 1
        assert len(fake.calls("POST", "/v1/batches")) == 1


def test_two_workers_on_one_postgresql_submit_every_item_exactly_once(request, standins, tmp_path):
    database = fresh_database(request, "postgres", tmp_path, "two_workers")
    job_id = asyncio.run(create_job(database, 2000))
    with FakeOpenAI().serve() as fake:
        env = environment(standins, database, fake, BATCH_OPENAI_MAX_REQUESTS="150", BATCH_LEASE_TTL_S="2")
        with ExitStack() as stack:
            stack.enter_context(worker(env, tmp_path / "a.log"))
            stack.enter_context(worker(env, tmp_path / "b.log"))
            wait_until(lambda: job_status(database, job_id) == "completed", "the job to complete")
        submitted = Counter()
        for upload in fake.calls("POST", "/v1/files"):
            for line in upload.body.split(b"\n"):
                if b'"custom_id"' in line and ENDPOINTS[0].encode() in line:
                    submitted[line.split(b'"custom_id":"')[1].split(b'"')[0]] += 1
        assert len(submitted) == 2000 and set(submitted.values()) == {1}
        assert fake.batches_created == len(fake.calls("POST", "/v1/batches")) == 14

"""Batch workers as real processes (`python -m server worker`) against one database and one fake provider: a worker
SIGKILLed at any step of submit, poll or fetch, two workers through a Retry-After longer than the lease, and two
workers running at once all end with one provider batch per chunk, one result per item and the cost booked once."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from server.core.config import PROJECT_ROOT
from server.db import migrate
from server.db.batch_models import BatchItem, BatchJob, ProviderBatch
from server.db.session import create_engine, session_factory
from server.services.offload.jobs import JobSpec, JobStore, NewItem
from server.services.offload.pricing import PriceTable
from tests.api.test_batch_providers import FAKES
from tests.fakes import FakeOpenAI
from tests.fakes.serving import FakeServer

DEADLINE_S = 120
ITEMS, PER_BATCH = 6, 2


@contextmanager
def worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "worker"],
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(30)


@contextmanager
def two_workers(env: dict[str, str], logs: Path) -> Iterator[None]:
    """Two workers at once, as two replicas would run: one holds the lease, the other stands by."""
    with ExitStack() as stack:
        for name in ("a", "b"):
            stack.enter_context(worker(env, logs / f"{name}.log"))
        yield


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


async def create_job(database_url: str, items: int, provider: str = "openai") -> str:
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url)
    try:
        job = await JobStore(session_factory(engine)).create(
            JobSpec(name="workers", provider=provider, model=FAKES[provider][1], kind="chat", schedule="now"),
            [NewItem(f"c{i:05d}", {"messages": [{"role": "user", "content": f"item {i}"}]}) for i in range(items)],
        )
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


def environment(
    standins, database_url: str, fake: FakeServer, provider: str = "openai", **extra: str
) -> dict[str, str]:
    generator, classifier = standins
    prefix = provider.upper()
    return {
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "DATABASE_URL": database_url,
        f"{prefix}_API_KEY": "test-key",
        f"{prefix}_BASE_URL": fake.base_url + FAKES[provider][2],
        f"BATCH_{prefix}_MAX_REQUESTS": str(PER_BATCH),
        "BATCH_POLL_INTERVAL_S": "0.2",
        "TORCH_NUM_THREADS": "1",
        "LOG_LEVEL": "warning",
        "EGRESS_RATE_LIMIT": "",
        **extra,
    }


def job_status(database_url: str, job_id: str) -> str:
    return read(database_url, select(BatchJob.status).where(BatchJob.id == job_id))[0][0]


def fresh_database(request: pytest.FixtureRequest, backend: str, tmp_path: Path, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / name}.db"
    from tests.conftest import _create_database

    postgres = request.getfixturevalue("postgres")
    asyncio.run(_create_database(postgres, name))
    return postgres.url(name)


def assert_exactly_once(database_url: str, job_id: str, fake: FakeServer, provider: str = "openai") -> None:
    """What every fault must end with: the job completed, one provider batch per chunk, one result per item (sent
    once: one attempt), the cost booked once."""
    chunks = ITEMS // PER_BATCH
    [(status, booked, cost, tokens)] = read(
        database_url,
        select(
            BatchJob.status, BatchJob.cost_booked, BatchJob.cost_usd, BatchJob.input_tokens + BatchJob.output_tokens
        ).where(BatchJob.id == job_id),
    )
    assert (status, booked, tokens) == ("completed", True, ITEMS * (12 + 7))
    assert cost == pytest.approx(PriceTable.load().cost(provider, FAKES[provider][1], ITEMS * 12, ITEMS * 7).cost_usd)
    items = read(
        database_url,
        select(BatchItem.custom_id, BatchItem.status, BatchItem.attempts, BatchItem.output.is_not(None)).where(
            BatchItem.job_id == job_id
        ),
    )
    assert sorted(tuple(item) for item in items) == [(f"c{i:05d}", "succeeded", 1, True) for i in range(ITEMS)]
    batches = read(
        database_url,
        select(ProviderBatch.status, ProviderBatch.provider_batch_id).where(ProviderBatch.job_id == job_id),
    )
    assert [status for status, _ in batches] == ["fetched"] * chunks
    assert len({provider_id for _, provider_id in batches}) == fake.batches_created == chunks


KILLS = [
    ("sqlite", "openai", "upload"),
    ("sqlite", "openai", "create"),
    ("postgres", "openai", "create"),
    ("sqlite", "openai", "poll"),
    ("sqlite", "openai", "results"),
    ("sqlite", "anthropic", "create"),
    ("sqlite", "gemini", "create"),
]


@pytest.mark.parametrize(("backend", "provider", "step"), KILLS, ids=["-".join(kill) for kill in KILLS])
def test_a_worker_killed_at_any_step_leaves_one_batch_per_chunk_and_one_result_per_item(
    request, backend, provider, step, standins, tmp_path
):
    """The fake keeps back its answer to the step (`upload`: the input file is stored, no batch yet; `create`: the
    batch is accepted, its id not recorded; `poll`: the read that ends the batch; `results`: the download), the
    worker is SIGKILLed there, and a new worker takes over once the 1 s lease has expired. The new worker starts
    after the kill: with a standby already running, the lease of a starved holder may lapse before the test reads
    who holds it, and the wrong process would be killed."""
    database = fresh_database(request, backend, tmp_path, f"killed_{provider}_{step}")
    job_id = asyncio.run(create_job(database, ITEMS, provider))
    with FAKES[provider][0]().serve() as fake:
        fake.settings.hold_at = step
        env = environment(standins, database, fake, provider, BATCH_LEASE_TTL_S="1")
        with worker(env, tmp_path / "first.log") as first:
            wait_until(fake.held.is_set, f"the worker to reach the {step} step")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        if step in ("upload", "create"):
            assert ("submitting", None) in read(database, select(ProviderBatch.status, ProviderBatch.provider_batch_id))
        with worker(env, tmp_path / "second.log"):
            wait_until(lambda: job_status(database, job_id) == "completed", "the job to complete")
    assert_exactly_once(database, job_id, fake, provider)


@pytest.mark.parametrize("longest_wait", ["30", "0.5"], ids=["waited-in-the-call", "left-to-a-later-tick"])
def test_two_workers_on_postgresql_create_once_through_a_retry_after_longer_than_the_lease(
    request, longest_wait, standins, tmp_path
):
    """The issue's scenario (the first create refused with a 130 s Retry-After; a 120 s lease; a call waits at most
    30 s) scaled down: a 3 s Retry-After, a 1 s lease. Waited in the call (longest wait 30 s), the lease is renewed
    meanwhile, so the other worker does not take over; left to a later tick (longest wait 0.5 s, as 30 s < 130 s),
    the batch is looked up by its key before it is created, by whichever worker holds the lease then."""
    database = fresh_database(request, "postgres", tmp_path, f"retry_after_{longest_wait.replace('.', '_')}")
    job_id = asyncio.run(create_job(database, ITEMS))
    with FakeOpenAI().serve() as fake:
        fake.settings.create_faults = ["retry_after_long"]
        fake.settings.long_retry_after_s = 3.0
        env = environment(standins, database, fake, BATCH_LEASE_TTL_S="1", BATCH_PROVIDER_MAX_BACKOFF_S=longest_wait)
        with two_workers(env, tmp_path):
            wait_until(lambda: job_status(database, job_id) == "completed", "the job to complete")
    assert fake.settings.create_faults == []
    assert len(fake.calls("POST", "/v1/batches")) == ITEMS // PER_BATCH + 1
    assert sorted(Counter(fake.batched_custom_ids()).items()) == [(f"c{i:05d}", 1) for i in range(ITEMS)]
    assert_exactly_once(database, job_id, fake)


def test_two_workers_on_one_postgresql_submit_every_item_exactly_once(request, standins, tmp_path):
    database = fresh_database(request, "postgres", tmp_path, "two_workers")
    job_id = asyncio.run(create_job(database, 2000))
    with FakeOpenAI().serve() as fake:
        env = environment(standins, database, fake, BATCH_OPENAI_MAX_REQUESTS="150", BATCH_LEASE_TTL_S="2")
        with two_workers(env, tmp_path):
            wait_until(lambda: job_status(database, job_id) == "completed", "the job to complete")
        # Counted in the batches, not the uploads: a holder starved past its lease stops before its create, and the
        # new holder uploads that chunk again (an unused file, never a second batch).
        submitted = Counter(fake.batched_custom_ids())
        assert len(submitted) == 2000 and set(submitted.values()) == {1}
        assert fake.batches_created == len(fake.calls("POST", "/v1/batches")) == 14

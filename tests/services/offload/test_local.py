"""The local batch provider (local.py): items claimed once and computed by our own models, at most `concurrency` at a
time, only for running jobs; what a dead holder or a failed runner left claimed is queued again."""

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from server.core import clock
from server.db.batch_models import BatchItem, BatchJob
from server.services.offload.jobs import JobSpec, JobStore, NewItem
from server.services.offload.local import LocalRunner, generation_options
from server.services.offload.service import BatchOffload
from tests.support.app import serving


def test_generation_options_take_either_token_limit_and_default_to_greedy_decoding():
    options = generation_options({"prompt": "x", "max_tokens": 7})
    assert (options.max_new_tokens, options.temperature, options.top_p, options.seed) == (7, 0.0, 1.0, None)
    assert generation_options({"max_new_tokens": 3}).max_new_tokens == 3
    assert generation_options({"max_tokens": 2, "max_new_tokens": 3}).max_new_tokens == 2
    sampled = generation_options({"temperature": "0.7", "top_p": 0.9, "seed": 4, "max_length": 30})
    assert (sampled.temperature, sampled.top_p, sampled.seed, sampled.max_length) == (0.7, 0.9, 4, 30)


def a_runner(sessions, offload: BatchOffload | None = None, *, concurrency: int = 4, requeue_s: float = 600.0):
    """A runner; without `offload` it has no models (enough for the requeue sweeps, which compute nothing)."""
    done: list[None] = []
    runner = LocalRunner(
        sessions,
        JobStore(sessions),
        offload.generation if offload else None,
        offload.sentiment if offload else None,
        concurrency=concurrency,
        max_attempts=3,
        holds_lease=lambda: True,
        item_done=lambda: done.append(None),
        requeue_s=requeue_s,
    )
    return runner, done


async def a_job(
    sessions, items: dict[str, str], *, provider: str = "local", kind: str = "generate", **values
) -> BatchJob:
    """A job with items in the given statuses (custom_id -> status), each tried once so far."""
    field = "prompt" if kind == "generate" else "text"
    job = await JobStore(sessions).create(
        JobSpec("j", provider, "gpt2", kind, schedule="now"),
        [NewItem(custom_id, {field: f"Once upon a time {custom_id}", "max_tokens": 3}) for custom_id in items],
    )
    async with sessions() as session, session.begin():
        for custom_id, status in items.items():
            await session.execute(
                update(BatchItem)
                .where(BatchItem.job_id == job.id, BatchItem.custom_id == custom_id)
                .values(status=status, attempts=1)
            )
        if values:
            await session.execute(update(BatchJob).where(BatchJob.id == job.id).values(**values))
    return job


async def items_of(sessions, job: BatchJob) -> dict[str, BatchItem]:
    async with sessions() as session:
        rows = (await session.scalars(select(BatchItem).where(BatchItem.job_id == job.id))).all()
    return {item.custom_id: item for item in rows}


async def test_items_a_previous_holder_claimed_are_queued_again_without_counting_the_attempt(sessions):
    local = await a_job(sessions, {"a": "submitted", "b": "succeeded", "c": "queued"}, status="in_progress")
    remote = await a_job(sessions, {"a": "submitted"}, provider="openai", status="in_progress")
    runner, _ = a_runner(sessions)
    assert await runner.requeue_orphans() == 1
    items = await items_of(sessions, local)
    assert (items["a"].status, items["a"].attempts) == ("queued", 0)
    assert items["b"].status == "succeeded" and items["c"].status == "queued"
    # A provider batch's items are the worker's, never the local runner's.
    assert (await items_of(sessions, remote))["a"].status == "submitted"
    assert await runner.requeue_orphans() == 0


async def test_items_left_claimed_longer_than_the_requeue_delay_are_queued_again(sessions):
    job = await a_job(sessions, {"stale": "submitted", "fresh": "submitted"}, status="in_progress")
    remote = await a_job(sessions, {"stale": "submitted"}, provider="openai", status="in_progress")
    long_ago = clock.now() - timedelta(seconds=120)
    async with sessions() as session, session.begin():
        await session.execute(
            update(BatchItem)
            .where(BatchItem.custom_id == "stale", BatchItem.job_id.in_([job.id, remote.id]))
            .values(updated_at=long_ago)
        )
    runner, _ = a_runner(sessions, requeue_s=60)
    assert await runner.requeue_stale() == 1
    items = await items_of(sessions, job)
    assert (items["stale"].status, items["stale"].attempts) == ("queued", 1)
    assert items["fresh"].status == "submitted"
    assert (await items_of(sessions, remote))["stale"].status == "submitted"


@pytest.fixture
async def offload(settings) -> AsyncIterator[BatchOffload]:
    """The app's batch offload, with its own worker and runner off: the test drives a runner of its own."""
    async with serving(settings.model_copy(update={"batch_worker": "off"})) as client:
        yield client.app.state.runtime.batch


async def test_a_runner_computes_at_most_its_concurrency_of_items_of_running_local_jobs(offload):
    sessions = offload.sessions
    job = await a_job(sessions, {"a": "queued", "b": "queued", "c": "queued"}, status="submitted")
    not_started = await a_job(sessions, {"a": "queued"}, status="queued")
    cancelling = await a_job(sessions, {"a": "queued"}, status="in_progress", cancel_requested=True)
    remote = await a_job(sessions, {"a": "queued"}, provider="openai", status="in_progress")
    runner, done = a_runner(sessions, offload, concurrency=2)

    assert await runner.run_available() == 2
    assert (await JobStore(sessions).get(job.id)).status == "in_progress"
    await runner.wait_idle()
    assert len(done) == 2
    assert await runner.run_available() == 1
    await runner.wait_idle()
    assert await runner.run_available() == 0

    items = await items_of(sessions, job)
    for item in items.values():
        assert item.status == "succeeded" and item.attempts == 2 and item.error is None
        assert isinstance(item.output["text"], str) and item.output["finish_reason"]
        assert item.input_tokens > 0 and 0 < item.output_tokens <= 3
    for other in (not_started, cancelling, remote):
        assert (await items_of(sessions, other))["a"].status == "queued"


async def test_a_predict_item_stores_a_label_and_a_score(offload):
    sessions = offload.sessions
    job = await a_job(sessions, {"a": "queued"}, kind="predict", status="in_progress")
    runner, _ = a_runner(sessions, offload)
    assert await runner.run_available() == 1
    await runner.wait_idle()
    [item] = (await items_of(sessions, job)).values()
    assert item.status == "succeeded" and set(item.output) == {"label", "score"}
    assert 0.0 <= item.output["score"] <= 1.0 and (item.input_tokens, item.output_tokens) == (0, 0)


async def test_an_item_its_model_cannot_take_fails_at_once_without_a_retry(offload):
    sessions = offload.sessions
    job = await a_job(sessions, {"a": "queued"}, status="in_progress")
    async with sessions() as session, session.begin():
        await session.execute(update(BatchItem).where(BatchItem.job_id == job.id).values(body={"text": "no prompt"}))
    runner, _ = a_runner(sessions, offload)
    assert await runner.run_available() == 1
    await runner.wait_idle()
    [item] = (await items_of(sessions, job)).values()
    assert item.status == "failed" and item.error.startswith("invalid request")
    assert item.completed_at is not None and item.output is None

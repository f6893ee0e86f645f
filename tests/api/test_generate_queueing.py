"""Queue, deadline and failure guarantees of /generate, under both schedulers."""

import asyncio

import pytest

from tests.api.gates import Gate, until_queued
from tests.api.test_generate import generate


@pytest.fixture(params=["continuous", "static"])
def settings(request, settings):
    """The tests below hold for both schedulers (GENERATOR_SCHEDULER)."""
    return settings.model_copy(update={"generator_scheduler": request.param})


async def test_full_queue_answers_503_with_retry_after(settings, app_client):
    runtime = app_client.app.state.runtime
    runtime.generation.batcher.gate.limit = 2
    gate = Gate(runtime.generation.batcher)
    first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
    await gate.wait_entered()
    queued = asyncio.create_task(generate(app_client, ["one", "two"], max_new_tokens=2))
    await until_queued(runtime.generation.batcher, 2)
    refused = await generate(app_client, ["three"], max_new_tokens=2)
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue is full" in refused.json()["detail"]
    gate.open.set()
    assert (await queued).status_code == 200 and (await first).status_code == 200


async def test_deadline_answers_504_and_the_item_is_never_computed(app_client):
    runtime = app_client.app.state.runtime
    gate = Gate(runtime.generation.batcher)
    first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
    await gate.wait_entered()
    # Only the late request has the short deadline: the first's, on a loaded machine, could pass before its batch.
    runtime.generation.timeout_s = 0.2
    late = await generate(app_client, ["too late"], max_new_tokens=2)
    assert late.status_code == 504 and "REQUEST_TIMEOUT_S" in late.json()["detail"]
    gate.open.set()
    await first
    await asyncio.sleep(0.05)
    assert len(gate.batches) == 1


async def test_a_failing_item_gets_500_and_its_batch_mates_succeed(app_client):
    runtime = app_client.app.state.runtime
    poison = tuple(runtime.generator.encode("poison pill"))
    gate = Gate(runtime.generation.batcher, fail_if=lambda jobs: any(job.prompt_ids == poison for job in jobs))
    first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
    await gate.wait_entered()
    good = [asyncio.create_task(generate(app_client, [f"good {i}"], max_new_tokens=2)) for i in range(3)]
    bad = asyncio.create_task(generate(app_client, ["poison pill"], max_new_tokens=2))
    await asyncio.sleep(0.2)
    gate.open.set()
    assert [(await t).status_code for t in good] == [200, 200, 200]
    failed = await bad
    assert failed.status_code == 500 and "failed on this input" in failed.json()["detail"]
    await first


async def test_a_request_that_does_not_fit_the_queue_is_refused_whole(app_client):
    runtime = app_client.app.state.runtime
    runtime.generation.batcher.gate.limit = 3
    gate = Gate(runtime.generation.batcher)
    first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
    await gate.wait_entered()
    queued = asyncio.create_task(generate(app_client, ["one"], max_new_tokens=2))
    await until_queued(runtime.generation.batcher, 1)
    refused = await generate(app_client, ["two", "three", "four"], max_new_tokens=2)
    assert refused.status_code == 503
    gate.open.set()
    assert (await queued).status_code == 200 and (await first).status_code == 200
    computed = {runtime.generator.tokenizer.decode(job.prompt_ids) for batch in gate.batches for job in batch}
    assert computed == {"warm up", "one"}

"""Work whose callers are all gone stops at the next decoding step (issue: abandoned work kept the model busy)."""

import asyncio
import threading

import pytest

from tests.support.metrics import metric

BLOCK_AT_STEP = 5


class StepGate:
    """Counts the generator's forward passes and holds the model inside pass number `BLOCK_AT_STEP`: at its token
    embedding, which every pass calls once (a decoding step runs the model's modules, not its forward)."""

    def __init__(self, model):
        self.steps = 0
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.hook = model.get_input_embeddings().register_forward_pre_hook(self._step)

    def _step(self, module, args) -> None:
        self.steps += 1
        if self.steps == BLOCK_AT_STEP:
            self.blocked.set()
            self.release.wait(30)


@pytest.fixture(params=["continuous", "static"])
def settings(request, settings):
    return settings.model_copy(update={"generator_scheduler": request.param})


@pytest.mark.parametrize("reason", ["deadline", "cancelled"])
async def test_a_long_batch_whose_callers_are_gone_stops_within_one_step(app_client, reason):
    runtime = app_client.app.state.runtime
    continuous = runtime.settings.generator_scheduler == "continuous"
    gate = StepGate(runtime.generator.model)
    aborted = metric("scheduler_aborted_items_total", model="generator", reason=reason)
    batches = metric("model_batch_seconds_count", model="generator")
    try:
        if reason == "deadline":
            runtime.generation.timeout_s = 0.5
        body = {"prompts": [f"long story {i}" for i in range(4)], "max_new_tokens": 256}
        request = asyncio.create_task(app_client.post("/generate", json=body))
        await asyncio.to_thread(gate.blocked.wait, 10)
        if reason == "deadline":
            assert (await request).status_code == 504
        else:
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        runtime.generation.timeout_s = 60
        short = asyncio.create_task(app_client.post("/generate", json={"prompts": ["short"], "max_new_tokens": 2}))
        await asyncio.sleep(0.05)
        gate.release.set()
        answered = await short
    finally:
        gate.release.set()
        gate.hook.remove()
    assert answered.status_code == 200
    # The long batch ran BLOCK_AT_STEP passes (prefill + 4 steps), not 256; the short request ran 2.
    assert gate.steps == BLOCK_AT_STEP + 2
    assert metric("scheduler_aborted_items_total", model="generator", reason=reason) - aborted == 4
    # One model call each for the static batcher; one per forward pass for the continuous loop.
    assert metric("model_batch_seconds_count", model="generator") - batches == (gate.steps if continuous else 2)
    if continuous:
        assert metric("scheduler_abort_steps_bucket", model="generator", le="1.0") == metric(
            "scheduler_abort_steps_count", model="generator"
        )

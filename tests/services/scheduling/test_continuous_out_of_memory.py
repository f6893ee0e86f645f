"""A GPU out of memory fails only the rows it hit: the batch shrinks to single rows, resumed where they were, and the
loop keeps serving. torch raises `torch.cuda.OutOfMemoryError` on the CPU build too, so this runs without a GPU."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.ml.decoding import GenerationParams
from server.ml.generator import TextGenerator
from server.ml.loader import locate
from server.services.errors import ModelFailed
from server.services.scheduling.continuous import ContinuousBatcher


class Job:
    def __init__(self, prompt_ids: tuple[int, ...], new_tokens: int):
        self.prompt_ids, self.params, self.seed = prompt_ids, GenerationParams(new_tokens), None

    deterministic = True


@pytest.fixture
async def setup(standins):
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    generator = TextGenerator.load(location, str(standins[0].parent))
    executor = ThreadPoolExecutor(1)
    batcher = ContinuousBatcher("generator", generator, executor, max_batch_size=8, max_wait_s=0.02, queue_limit=64)
    batcher.start()
    yield generator, batcher
    await batcher.close()
    executor.shutdown()


async def test_rows_that_ran_out_of_memory_together_finish_one_at_a_time(setup):
    generator, batcher = setup
    step, failures = generator.decoder.step, []

    def step_within_memory(batch):
        if len(batch) > 1 and len(batch.sequences[0].tokens) >= 2:
            failures.append(len(batch))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        step(batch)

    generator.decoder.step = step_within_memory
    jobs = [Job(tuple(generator.encode(f"Row {i} of a batch")), 6) for i in range(4)]
    results = await asyncio.gather(*(batcher.submit([job], timeout_s=60) for job in jobs))
    assert failures, "the batch never ran out of memory"
    generator.decoder.step = step
    for job, [out] in zip(jobs, results, strict=True):
        assert out == generator.generate([job.prompt_ids], job.params)[0]


async def test_a_row_too_large_for_memory_alone_fails_and_the_loop_serves_on(setup):
    generator, batcher = setup
    huge = tuple(generator.encode("a prompt too long for this device"))
    step = generator.decoder.step

    def step_within_memory(batch):
        if any(s.prompt == huge for s in batch.sequences):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        step(batch)

    generator.decoder.step = step_within_memory
    small = Job(tuple(generator.encode("small")), 4)
    results = await asyncio.gather(
        batcher.submit([Job(huge, 4)], timeout_s=60), batcher.submit([small], timeout_s=60), return_exceptions=True
    )
    assert isinstance(results[0], ModelFailed) and "out of memory" in str(results[0])
    [after] = await batcher.submit([Job(tuple(generator.encode("after")), 3)], timeout_s=60)
    assert results[1] == [generator.generate([small.prompt_ids], small.params)[0]] and after.token_ids

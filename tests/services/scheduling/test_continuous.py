"""The continuous scheduler with the real stand-in generator: rows join and leave between decoding steps."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from server.core.supervisor import RestartPolicy
from server.ml.decoding import DecodeBatch, GenerationParams
from server.ml.generator import TextGenerator
from server.services.errors import DeadlineExceeded, ModelFailed, Overloaded
from server.services.scheduling.continuous import ContinuousBatcher
from tests.support.metrics import metric
from tests.support.waiting import until


@dataclass(frozen=True)
class Job:
    prompt_ids: tuple[int, ...]
    params: GenerationParams
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        return self.params.greedy or self.seed is not None


class Passes:
    """Records each forward pass of the generator (the rows it ran) and can hold the loop before pass `hold_at`."""

    def __init__(self, generator: TextGenerator):
        self.log: list[tuple[str, list[tuple[int, ...]]]] = []
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        decoder = generator.decoder
        prefill, step = decoder.prefill, decoder.step
        decoder.prefill = lambda rows: self._pass("prefill", [r.prompt for r in rows], lambda: prefill(rows))
        decoder.step = lambda batch: self._pass("decode", [r.prompt for r in batch.sequences], lambda: step(batch))

    def _pass(self, kind: str, prompts: list, call):
        if len(self.log) == self.hold_at:
            self.held.set()
            self.release.wait(30)
        self.log.append((kind, prompts))
        return call()

    async def hold_before(self, index: int) -> None:
        self.hold_at = index
        self.release.clear()
        await asyncio.to_thread(self.held.wait, 10)

    def let_go(self) -> None:
        self.hold_at = None
        self.release.set()


@pytest.fixture
async def generator(standins) -> TextGenerator:
    from server.ml.loader import locate

    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    return TextGenerator.load(location, str(standins[0].parent))


@pytest.fixture
async def make(generator: TextGenerator):
    executor = ThreadPoolExecutor(1)
    made: list[ContinuousBatcher] = []

    def build(**overrides) -> tuple[ContinuousBatcher, Passes]:
        options = {"max_batch_size": 8, "max_wait_s": 0.005, "queue_limit": 100} | overrides
        batcher = ContinuousBatcher("generator", generator, executor, **options)
        batcher.start()
        made.append(batcher)
        return batcher, Passes(generator)

    yield build
    for batcher in made:
        await batcher.close()
    executor.shutdown()


def job(generator: TextGenerator, text: str, new_tokens: int, **params) -> Job:
    seed = params.pop("seed", None)
    return Job(tuple(generator.encode(text)), GenerationParams(new_tokens, **params), seed)


async def test_a_short_row_leaves_early_and_a_newcomer_joins_a_running_long_row(make, generator):
    batcher, passes = make()
    long = asyncio.create_task(batcher.submit([job(generator, "A long story", 40)], timeout_s=30))
    await passes.hold_before(3)
    short = asyncio.create_task(batcher.submit([job(generator, "Short", 4)], timeout_s=30))
    await asyncio.sleep(0.05)
    passes.let_go()
    [short_out] = await short
    [long_out] = await long
    assert short_out == generator.generate([generator.encode("Short")], GenerationParams(4))[0]
    assert long_out == generator.generate([generator.encode("A long story")], GenerationParams(40))[0]
    # The newcomer was prefilled beside the running row and left long before it: read from the passes themselves.
    mine = tuple(generator.encode("Short"))
    last_with_short = max(i for i, (_, prompts) in enumerate(passes.log) if mine in prompts)
    assert last_with_short < 12 and len(passes.log) >= 40
    assert [kind for kind, _ in passes.log].count("prefill") == 2


async def test_the_linger_after_a_long_busy_period_counts_the_answered_rows_time_in_the_batch(make, generator):
    """The loop lingers for the callers it answered last at most a tenth of the time their rows spent in the batch, as
    a static batch's duration is its rows', not a tenth of the loop's busy period, which grows without bound."""
    batcher, passes = make()
    first = asyncio.create_task(batcher.submit([job(generator, "A long story", 30, ignore_eos=True)], timeout_s=30))
    await passes.hold_before(2)
    await asyncio.sleep(1.5)  # the loop is busy, on the first row, for longer than the rows answered last
    passes.let_go()
    await until(lambda: len(passes.log) > 4)
    # Two rows that join together and finish together, after the first: the rows answered last.
    last = [job(generator, text, 60, ignore_eos=True) for text in ("Second story", "Third story")]
    started = asyncio.get_running_loop().time()
    await asyncio.gather(first, batcher.submit(last, timeout_s=30))
    in_batch = asyncio.get_running_loop().time() - started
    await until(lambda: batcher._history.callers > 0)  # the loop's record of its drain
    history = batcher._history
    assert history.callers == 2
    assert 0 < history.duration_s <= in_batch + 0.05 and history.duration_s < 1.0


async def test_the_loop_gives_its_thread_back_after_every_step(make, generator):
    """Both models share one torch thread (runtime.torch_thread): other work on it runs between two steps."""
    batcher, passes = make()
    long = asyncio.create_task(batcher.submit([job(generator, "A long story", 40)], timeout_s=30))
    await passes.hold_before(3)
    other = asyncio.wrap_future(batcher.executor.submit(lambda: len(passes.log)))
    passes.let_go()
    assert await other == 4
    assert not long.done()
    await long
    assert len(passes.log) >= 40


async def test_rows_with_different_sampling_parameters_share_decoding_steps(make, generator):
    batcher, passes = make()
    jobs = [
        job(generator, "Same start", 6),
        job(generator, "Same start", 6, temperature=0.8, seed=4),
        job(generator, "Other", 6, temperature=1.5, top_p=0.5, seed=9),
    ]
    outs = await asyncio.gather(*(batcher.submit([j], timeout_s=30) for j in jobs))
    for j, [out] in zip(jobs, outs, strict=True):
        assert out == generator.generate([j.prompt_ids], j.params, [j.seed])[0]
    assert passes.log[0] == ("prefill", [j.prompt_ids for j in jobs])
    assert all(len(prompts) == 3 for kind, prompts in passes.log[1:])


async def test_tokens_stream_after_each_step_and_add_up_to_the_answer(make, generator):
    batcher, passes = make()
    chunks: list[list[int]] = []
    request = asyncio.create_task(
        batcher.submit([job(generator, "Streaming", 7)], timeout_s=30, on_tokens=lambda ids, _: chunks.append(ids))
    )
    await passes.hold_before(1)
    await until(lambda: chunks, 5)
    # The first token arrived while the loop was held after the prefill: before any decoding step ran.
    assert len(chunks) == 1 and len(chunks[0]) == 1 and len(passes.log) == 1
    passes.let_go()
    [out] = await request
    assert [t for tokens in chunks for t in tokens] == out.token_ids and len(chunks) == len(out.token_ids)


async def test_equal_deterministic_jobs_share_one_row_and_a_late_joiner_gets_the_tokens_so_far(make, generator):
    batcher, passes = make()
    same = job(generator, "Shared row", 12)
    first = asyncio.create_task(batcher.submit([same], timeout_s=30))
    await passes.hold_before(4)
    late: list[int] = []
    second = asyncio.create_task(batcher.submit([same], timeout_s=30, on_tokens=lambda ids, _: late.extend(ids)))
    await asyncio.sleep(0.05)
    passes.let_go()
    assert (await first) == (await second)
    assert late == (await second)[0].token_ids
    assert [kind for kind, _ in passes.log].count("prefill") == 1


async def test_interactive_rows_join_first_and_background_rows_are_capped(make, generator):
    batcher, passes = make(max_batch_size=8, background_max_size=2)
    background = [
        asyncio.create_task(batcher.submit([job(generator, f"background {i}", 30)], timeout_s=60, background=True))
        for i in range(5)
    ]
    await passes.hold_before(2)
    interactive = asyncio.create_task(batcher.submit([job(generator, "interactive", 3)], timeout_s=30))
    await asyncio.sleep(0.05)
    passes.let_go()
    [interactive_out] = await interactive
    assert interactive_out == generator.generate([generator.encode("interactive")], GenerationParams(3))[0]
    background_prompts = {tuple(generator.encode(f"background {i}")) for i in range(5)}
    ran_before_interactive_done = {p for _, prompts in passes.log[:6] for p in prompts}
    assert max(sum(p in background_prompts for p in prompts) for _, prompts in passes.log) <= 2
    assert tuple(generator.encode("interactive")) in ran_before_interactive_done
    for i, [out] in enumerate(await asyncio.gather(*background)):
        assert out == generator.generate([generator.encode(f"background {i}")], GenerationParams(30))[0]
    mine = tuple(generator.encode("interactive"))
    joined = next(i for i, (_, prompts) in enumerate(passes.log) if mine in prompts)
    left = next(i for i in range(joined, len(passes.log)) if mine not in passes.log[i][1])
    assert not any(kind == "prefill" for kind, _ in passes.log[joined + 1 : left]), "background joined meanwhile"
    assert all(prompts == [mine] for _, prompts in passes.log[joined + 1 : left]), "background rows shared its steps"


async def test_a_cancelled_caller_frees_its_row_within_one_step(make, generator):
    batcher, passes = make()
    before = metric("scheduler_abort_steps_count", model="generator")
    within_one = metric("scheduler_abort_steps_bucket", model="generator", le="1.0")
    other = asyncio.create_task(batcher.submit([job(generator, "stays", 20)], timeout_s=30))
    doomed = asyncio.create_task(batcher.submit([job(generator, "leaves", 200)], timeout_s=30))
    await passes.hold_before(5)
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    passes.let_go()
    await other
    leaves = tuple(generator.encode("leaves"))
    assert sum(leaves in prompts for _, prompts in passes.log) <= 6
    assert metric("scheduler_abort_steps_count", model="generator") - before == 1
    assert metric("scheduler_abort_steps_bucket", model="generator", le="1.0") - within_one == 1


async def test_deadline_is_a_504_and_the_row_leaves_at_the_next_step(make, generator):
    batcher, passes = make()
    # A deadline well after the three passes before the hold, which took up to 0.25 s with the CPUs busy.
    slow = asyncio.create_task(batcher.submit([job(generator, "slow", 200)], timeout_s=2.0))
    await passes.hold_before(3)
    assert not slow.done() and len(passes.log) == 3, "held before the deadline"
    with pytest.raises(DeadlineExceeded):
        await slow
    passes.let_go()
    while batcher.running:
        await asyncio.sleep(0.01)
    assert len(passes.log) == 4


async def test_a_row_that_breaks_a_step_fails_alone_and_the_others_finish(make, generator):
    batcher, passes = make()
    poison = tuple(generator.encode("poison pill"))
    step = generator.decoder.step

    def failing(batch):
        if any(s.prompt == poison for s in batch.sequences) and len(batch.sequences[0].tokens) >= 3:
            raise RuntimeError("model exploded on this row")
        step(batch)

    generator.decoder.step = failing
    good = [job(generator, f"good {i}", 6) for i in range(3)]
    results = await asyncio.gather(
        *(batcher.submit([j], timeout_s=30) for j in good),
        batcher.submit([Job(poison, GenerationParams(6))], timeout_s=30),
        return_exceptions=True,
    )
    assert isinstance(results[3], ModelFailed)
    for j, [out] in zip(good, results[:3], strict=True):
        assert out == generator.generate([j.prompt_ids], j.params)[0]


async def test_a_full_queue_refuses_the_whole_request(make, generator):
    batcher, passes = make(max_batch_size=1, queue_limit=2)
    running = asyncio.create_task(batcher.submit([job(generator, "busy", 50)], timeout_s=30))
    await passes.hold_before(2)
    waiting = asyncio.create_task(batcher.submit([job(generator, "one", 2)], timeout_s=30))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        with batcher.admission(2):
            pass
    passes.let_go()
    await asyncio.gather(running, waiting)


FAST_RESTART = RestartPolicy(backoff_s=0.01, max_backoff_s=0.05, window_s=60, give_up_after=3)


class FailOnce:
    """Replaces a method of `DecodeBatch` (KV-cache surgery, outside the guarded forward pass) with one that raises
    on its first call, or on every call with `always`."""

    def __init__(self, monkeypatch, name: str, always: bool = False):
        self.calls = 0
        original = getattr(DecodeBatch, name)

        def failing(batch, *args):
            self.calls += 1
            if always or self.calls == 1:
                raise MemoryError(f"injected into DecodeBatch.{name}")
            return original(batch, *args)

        monkeypatch.setattr(DecodeBatch, name, failing)


@pytest.mark.parametrize("surgery", ["extend", "keep"])
async def test_an_error_outside_the_forward_pass_fails_the_rows_the_loop_owned_and_the_loop_restarts(
    make, generator, monkeypatch, surgery
):
    batcher, passes = make(restart=FAST_RESTART)
    before = metric("background_task_failures_total", task="batcher-generator")
    # Rows of different lengths (a short one leaves: `keep`), then more rows joining the running batch (`extend`).
    first = [
        asyncio.create_task(batcher.submit([job(generator, f"first {i}", 3 + 6 * i)], timeout_s=30)) for i in range(3)
    ]
    await passes.hold_before(2)
    FailOnce(monkeypatch, surgery)
    joining = [asyncio.create_task(batcher.submit([job(generator, f"joining {i}", 5)], timeout_s=30)) for i in range(3)]
    await asyncio.sleep(0.05)
    passes.let_go()
    outcomes = await asyncio.gather(*first, *joining, return_exceptions=True)
    failed = [out for out in outcomes if isinstance(out, ModelFailed)]
    assert failed and all(f"injected into DecodeBatch.{surgery}" in str(out) for out in failed)
    assert all(isinstance(out, list | ModelFailed) for out in outcomes), outcomes
    assert metric("background_task_failures_total", task="batcher-generator") - before == 1
    later = job(generator, "asked after the failure", 6)
    assert await batcher.submit([later], timeout_s=30) == generator.generate([later.prompt_ids], later.params)
    assert batcher.supervisor.state == "running" and not batcher.running


async def test_a_loop_that_fails_every_turn_gives_up_and_refuses_at_once(make, generator, monkeypatch):
    batcher, passes = make(restart=FAST_RESTART)
    monkeypatch.setattr(ContinuousBatcher, "_park_or_resume", lambda self: 1 / 0)
    for attempt in range(FAST_RESTART.give_up_after):
        with pytest.raises(ModelFailed, match="ZeroDivisionError"):
            await batcher.submit([job(generator, f"doomed {attempt}", 4)], timeout_s=30)
        await until(lambda: batcher.supervisor.state != "restarting")
    assert batcher.supervisor.state == "failed"
    with pytest.raises(ModelFailed, match="restart"):
        await batcher.submit([job(generator, "too late", 4)], timeout_s=30)


async def test_work_waiting_without_a_forward_pass_beyond_the_stall_limit_is_a_stall(make, generator):
    batcher, passes = make(stall_s=0.3)
    assert not batcher.stalled
    request = asyncio.create_task(batcher.submit([job(generator, "held", 6)], timeout_s=30))
    await passes.hold_before(2)
    await until(lambda: batcher.stalled)
    passes.let_go()
    await request
    assert not batcher.stalled


async def test_a_guilty_row_among_32_is_found_by_bisection_while_the_others_go_on(make, generator):
    batcher, passes = make(max_batch_size=32, queue_limit=100)
    loop = asyncio.get_running_loop()
    guilty = tuple(generator.encode("row 13"))
    newcomer_job = job(generator, "newcomer", 3)
    prefill, step = generator.decoder.prefill, generator.decoder.step
    log: list[tuple[str, list[tuple[int, ...]], bool]] = []
    newcomer: list = []

    def poisoned(kind, rows, call):
        row = next((r for r in rows if r.prompt == guilty), None)
        failing = row is not None and len(row.tokens) >= 2
        log.append((kind, [r.prompt for r in rows], failing))
        if failing:
            if not newcomer:  # an arrival while the bisection runs
                newcomer.append(asyncio.run_coroutine_threadsafe(batcher.submit([newcomer_job], timeout_s=30), loop))
            raise RuntimeError("this row breaks the model")
        return call()

    generator.decoder.prefill = lambda rows: poisoned("prefill", rows, lambda: prefill(rows))
    generator.decoder.step = lambda batch: poisoned("decode", batch.sequences, lambda: step(batch))
    jobs = [job(generator, f"row {i}", 8) for i in range(32)]
    outcomes = await asyncio.gather(*(batcher.submit([j], timeout_s=60) for j in jobs), return_exceptions=True)
    assert isinstance(outcomes[13], ModelFailed) and "this row breaks the model" in str(outcomes[13])
    for i, (j, out) in enumerate(zip(jobs, outcomes, strict=True)):
        if i != 13:
            assert out == generator.generate([j.prompt_ids], j.params), i
    assert await asyncio.wrap_future(newcomer[0]) == generator.generate([newcomer_job.prompt_ids], newcomer_job.params)
    first_failure = next(i for i, (_, _, failing) in enumerate(log) if failing)
    after = log[first_failure + 1 :]
    bisection = [prompts for kind, prompts, _ in after if kind == "prefill" and newcomer_job.prompt_ids not in prompts]
    assert len(bisection) <= 5 + 1, "log2(32) + 1 extra passes"
    resumed = [
        prompts for kind, prompts, failing in after if kind == "prefill" and prompts in bisection and not failing
    ]
    assert sorted(p for prompts in resumed for p in prompts) == sorted(
        j.prompt_ids for j in jobs if j.prompt_ids != guilty
    ), "every innocent row resumed once"
    # Meanwhile the newcomer was admitted and the rows cleared first kept decoding.
    last_bisection = max(i for i, (kind, prompts, _) in enumerate(after) if kind == "prefill" and prompts in bisection)
    joined = next(i for i, (kind, prompts, _) in enumerate(after) if newcomer_job.prompt_ids in prompts)
    assert joined < last_bisection
    assert any(kind == "decode" for kind, _, _ in after[:last_bisection])


async def test_a_job_joining_a_waiting_row_takes_no_queue_room(make, generator):
    batcher, passes = make(max_batch_size=1, queue_limit=2)
    running = asyncio.create_task(batcher.submit([job(generator, "busy", 50)], timeout_s=30))
    await passes.hold_before(2)
    same = job(generator, "one", 2)
    waiting = [asyncio.create_task(batcher.submit([same], timeout_s=30)) for _ in range(3)]
    other = asyncio.create_task(batcher.submit([job(generator, "two", 2)], timeout_s=30))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        with batcher.admission(1):
            pass
    passes.let_go()
    outputs = await asyncio.gather(running, *waiting, other)
    assert outputs[1] == outputs[2] == outputs[3]

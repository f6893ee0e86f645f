from pathlib import Path

from server.ml.generator import GenerationParams, TextGenerator
from server.ml.loader import locate
from tests.ml.conftest import LONG, MIDDLE, SHORT


def test_greedy_output_is_identical_batched_and_alone(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=12)
    prompts = [generator.encode(p) for p in (LONG, MIDDLE, SHORT)]
    batched = generator.generate(prompts, params)
    for prompt, together in zip(prompts, batched, strict=True):
        alone = generator.generate([prompt], params)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text


def test_seeded_sampling_does_not_depend_on_batch_mates(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    prompt = generator.encode(MIDDLE)
    alone = generator.generate([prompt], params, [1234])[0]
    among = generator.generate([generator.encode(LONG), prompt, generator.encode(SHORT)], params, [5, 1234, 6])[1]
    assert alone.token_ids == among.token_ids


def test_unseeded_sampling_draws_fresh_samples(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=16, temperature=5.0)
    prompt = generator.encode(SHORT)
    draws = {tuple(generator.generate([prompt], params)[0].token_ids) for _ in range(4)}
    assert len(draws) > 1


def test_length_limit_and_eos_are_reported(generator: TextGenerator, standins: tuple[Path, Path]):
    out = generator.generate([generator.encode(SHORT)], GenerationParams(max_new_tokens=5))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    third = out.token_ids[2]
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    stopping = TextGenerator.load(location, str(standins[0].parent))
    stopping.tokenizer.eos_token = stopping.tokenizer.convert_ids_to_tokens(third)
    stopped = stopping.generate([generator.encode(SHORT)], GenerationParams(max_new_tokens=5))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(third)]


def test_abandoned_rows_stop_at_the_next_step_and_the_others_are_unchanged(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=20)
    prompts = [generator.encode(p) for p in (LONG, MIDDLE, SHORT)]
    steps = []
    hook = generator.model.register_forward_pre_hook(lambda module, args: steps.append(1))
    try:
        outputs = generator.generate(prompts, params, abandoned=lambda row: row == 1 and len(steps) >= 3)
        mixed_steps = len(steps)
        steps.clear()
        everything_gone = generator.generate(prompts, params, abandoned=lambda row: len(steps) >= 3)
    finally:
        hook.remove()
    assert outputs[1].finish_reason == "aborted" and outputs[1].token_ids == []
    for row in (0, 2):
        assert outputs[row] == generator.generate([prompts[row]], params)[0]
    assert mixed_steps == 20
    assert len(steps) == 3 and all(out.finish_reason == "aborted" for out in everything_gone)

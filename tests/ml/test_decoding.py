import torch

from server.ml.decoding import DecodeBatch, GenerationParams, GrowingLayer, Sequence
from server.ml.generator import Generation, TextGenerator
from tests.ml.conftest import LONG, MIDDLE, SHORT

PROMPTS = (LONG, MIDDLE, SHORT, "A", "In the beginning the universe was created")


def decode(
    generator: TextGenerator, sequences: list[Sequence], joining: dict[int, list[Sequence]] | None = None
) -> dict[int, Generation]:
    """Decode `sequences`, letting `joining[step]` join before that step; finished rows leave at once."""
    pending = {0: sequences, **(joining or {})}
    rows = [s for step in sorted(pending) for s in pending[step]]
    batch: DecodeBatch | None = None
    step = 0
    with torch.inference_mode():
        while pending or (batch is not None and len(batch)):
            if step in pending:
                newcomers = generator.decoder.prefill(pending.pop(step))
                batch = newcomers if batch is None else batch
                if batch is not newcomers:
                    batch.extend(newcomers)
            batch.keep([i for i, s in enumerate(batch.sequences) if not s.finish_reason])
            if len(batch):
                generator.decoder.step(batch)
            step += 1
    return {i: generator.result(s) for i, s in enumerate(rows)}


def test_greedy_rows_match_transformers_generate_alone_and_batched(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=14)
    prompts = [generator.encode(p) for p in PROMPTS]
    reference = [generator.generate([p], params)[0] for p in prompts]
    batched = decode(generator, [Sequence(tuple(p), params) for p in prompts])
    assert [batched[i] for i in range(len(prompts))] == reference
    assert reference == generator.generate(prompts, params)


def test_rows_joining_and_leaving_mid_flight_keep_their_tokens(generator: TextGenerator):
    prompts = [generator.encode(p) for p in PROMPTS]
    lengths = (20, 3, 9, 14, 6)
    reference = [generator.generate([p], GenerationParams(n))[0] for p, n in zip(prompts, lengths, strict=True)]
    first = [
        Sequence(tuple(prompts[0]), GenerationParams(lengths[0])),
        Sequence(tuple(prompts[1]), GenerationParams(lengths[1])),
    ]
    joining = {
        2: [Sequence(tuple(prompts[2]), GenerationParams(lengths[2]))],
        5: [
            Sequence(tuple(prompts[3]), GenerationParams(lengths[3])),
            Sequence(tuple(prompts[4]), GenerationParams(lengths[4])),
        ],
    }
    out = decode(generator, first, joining)
    assert [out[i] for i in range(5)] == reference


def test_leaving_rows_free_cache_columns(generator: TextGenerator):
    long, short = generator.encode(LONG), generator.encode(SHORT)
    with torch.inference_mode():
        batch = generator.decoder.prefill(
            [Sequence(tuple(long), GenerationParams(4)), Sequence(tuple(short), GenerationParams(4))]
        )
    assert batch.mask.shape[1] == len(long)
    batch.keep([1])
    assert batch.mask.shape[1] == len(short) and batch.cache.layers[0].keys.shape[2] == len(short)


def test_seeded_sampling_matches_the_static_path_in_any_batch(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    prompts = [generator.encode(p) for p in PROMPTS[:3]]
    static = generator.generate(prompts, params, seeds=[7, 8, 9])
    alone = decode(generator, [Sequence(tuple(prompts[1]), params, seed=8)])[0]
    joined = decode(
        generator,
        [Sequence(tuple(prompts[0]), params, seed=7)],
        {3: [Sequence(tuple(prompts[1]), params, seed=8), Sequence(tuple(prompts[2]), params, seed=9)]},
    )
    assert alone == static[1] == joined[1]
    assert [joined[0], joined[2]] == [static[0], static[2]]


def test_rows_with_different_parameters_share_steps(generator: TextGenerator):
    prompt = tuple(generator.encode(MIDDLE))
    greedy, sampled = GenerationParams(8), GenerationParams(8, temperature=0.7)
    together = decode(generator, [Sequence(prompt, greedy), Sequence(prompt, sampled, seed=3)])
    assert together[0] == generator.generate([prompt], greedy)[0]
    assert together[1] == generator.generate([prompt], sampled, seeds=[3])[0]


def test_stop_strings_end_the_row_and_cut_the_text(generator: TextGenerator):
    prompt = tuple(generator.encode(MIDDLE))
    full = generator.generate([prompt], GenerationParams(16))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    params = GenerationParams(16, stop=(stop,))
    static = generator.generate([prompt], params)[0]
    continuous = decode(generator, [Sequence(prompt, params)])[0]
    assert static == continuous
    assert continuous.finish_reason == "stop" and continuous.text == full.text[: full.text.find(stop)]
    assert len(continuous.token_ids) < 16 and full.token_ids[: len(continuous.token_ids)] == continuous.token_ids


def test_a_resumed_row_continues_as_if_never_interrupted(generator: TextGenerator):
    params = GenerationParams(12)
    prompt = tuple(generator.encode(LONG))
    reference = generator.generate([prompt], params)[0]
    interrupted = Sequence(prompt, params)
    with torch.inference_mode():
        batch = generator.decoder.prefill([interrupted])
        for _ in range(4):
            generator.decoder.step(batch)
    resumed = decode(generator, [interrupted])[0]
    assert resumed == reference


def test_rows_split_off_and_merged_back_keep_their_tokens(generator: TextGenerator):
    prompts = [tuple(generator.encode(p)) for p in PROMPTS[:4]]
    lengths = (12, 9, 3, 10)
    reference = [generator.generate([p], GenerationParams(n))[0] for p, n in zip(prompts, lengths, strict=True)]
    rows = [Sequence(p, GenerationParams(n)) for p, n in zip(prompts, lengths, strict=True)]

    def step(batch: DecodeBatch) -> None:
        batch.keep([i for i, s in enumerate(batch.sequences) if not s.finish_reason])
        if len(batch):
            generator.decoder.step(batch)

    with torch.inference_mode():
        batch = generator.decoder.prefill(rows)
        step(batch)
        parked = batch.split([1, 3])
        for _ in range(4):
            step(batch)
        batch.extend(parked)
        while not all(s.finish_reason for s in rows):
            step(batch)
    assert [generator.result(s) for s in rows] == reference


def test_a_decoding_step_writes_its_position_into_the_cache_in_place(generator: TextGenerator):
    params = GenerationParams(max_new_tokens=8)
    rows = [Sequence(tuple(generator.encode(p)), params) for p in (LONG, SHORT)]
    with torch.inference_mode():
        batch = generator.decoder.prefill(rows)
        generator.decoder.step(batch)
        layer = batch.cache.layers[0]
        where, length = layer.keys.data_ptr(), layer.keys.shape[2]
        generator.decoder.step(batch)
        assert (layer.keys.data_ptr(), layer.keys.shape[2]) == (where, length + 1)
        assert layer.values.shape == layer.keys.shape
        batch.keep([0])  # a row left: the tensors were replaced, so the next step copies them into new room once
        generator.decoder.step(batch)
        assert layer.keys.data_ptr() != where and layer.keys.shape[:3] == (1, layer.keys.shape[1], length + 2)


def test_rows_keep_transformers_tokens_when_the_cache_outgrows_its_room(generator: TextGenerator, monkeypatch):
    monkeypatch.setattr(GrowingLayer, "SPARE", 1)  # a new buffer every other step
    params = GenerationParams(max_new_tokens=10)
    prompts = [generator.encode(p) for p in PROMPTS]
    reference = [generator.generate([p], params)[0] for p in prompts]
    out = decode(generator, [Sequence(tuple(p), params) for p in prompts])
    assert [out[i] for i in range(len(prompts))] == reference

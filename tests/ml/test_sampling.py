"""Per-row extensions of the decoding loop (top_k, repetition_penalty, min_tokens, ignore_eos) and the
log-probabilities it reports, checked against transformers on the stand-in model."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from server.ml.decoding import GenerationParams, Sequence
from server.ml.generator import TextGenerator
from server.ml.sampling import penalize_repetition
from tests.ml.conftest import LONG, MIDDLE, SHORT


def decode(generator: TextGenerator, *sequences: Sequence) -> list[list[int]]:
    with torch.inference_mode():
        generator.decoder.complete(list(sequences))
    return [s.tokens for s in sequences]


def row(generator: TextGenerator, text: str, seed: int | None = None, **params) -> Sequence:
    return Sequence(tuple(generator.encode(text)), GenerationParams(**{"max_new_tokens": 8, **params}), seed)


@pytest.fixture(scope="module")
def reference(standins) -> AutoModelForCausalLM:
    """The stand-in as transformers loads it, without the server's kernels."""
    return AutoModelForCausalLM.from_pretrained(standins[0]).eval()


def test_logprobs_are_log_softmax_of_the_models_logits_for_prompt_and_generated_tokens(generator, reference):
    scored = row(generator, MIDDLE, max_new_tokens=5, logprobs=3, prompt_logprobs=True)
    plain = row(generator, LONG, max_new_tokens=5)
    decode(generator, scored, plain)
    ids = [*scored.prompt, *scored.tokens]
    with torch.inference_mode():
        expected = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(scored.prompt)
    entries = [*scored.prompt_logprobs[1:], *scored.logprobs]
    for position, entry in enumerate(entries):
        assert entry.token == ids[position + 1]
        assert entry.logprob == pytest.approx(float(expected[position, entry.token]), abs=1e-4)
        best = torch.topk(expected[position], 3)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert [p for _, p in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # Scoring a row leaves its tokens, and its batch-mate's, as they are without it.
    assert decode(generator, row(generator, MIDDLE, max_new_tokens=5), row(generator, LONG, max_new_tokens=5)) == [
        scored.tokens,
        plain.tokens,
    ]


def test_no_new_tokens_scores_the_prompt_alone(generator):
    [tokens] = decode(generator, scored := row(generator, SHORT, max_new_tokens=0, logprobs=1, prompt_logprobs=True))
    assert tokens == [] and scored.finish_reason == "length" and len(scored.prompt_logprobs) == len(scored.prompt)
    out = generator.generate([scored.prompt], scored.params)[0]
    assert (out.token_ids, out.logprobs, out.prompt_logprobs) == ([], [], scored.prompt_logprobs)


def test_top_k_one_is_greedy_and_leaves_its_neighbours_alone(generator):
    [greedy] = decode(generator, row(generator, MIDDLE, max_new_tokens=10))
    [seeded_alone] = decode(generator, row(generator, SHORT, 3, max_new_tokens=10, temperature=1.0))
    top_one, seeded = decode(
        generator,
        row(generator, MIDDLE, 11, max_new_tokens=10, temperature=1.5, top_k=1),
        row(generator, SHORT, 3, max_new_tokens=10, temperature=1.0),
    )
    assert top_one == greedy and seeded == seeded_alone
    [wide] = decode(generator, row(generator, MIDDLE, 11, max_new_tokens=10, temperature=1.5, top_k=50))
    assert wide != greedy


def test_repetition_penalty_is_transformers_processor_and_its_greedy_output(generator, reference):
    scores = torch.randn(generator.model.config.vocab_size)
    seen = [5, 9, 9, 300, 17]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), scores.unsqueeze(0))[0]
    assert torch.equal(penalize_repetition(scores, seen, 1.3), expected)

    penalized, plain = decode(
        generator,
        row(generator, MIDDLE, max_new_tokens=12, repetition_penalty=1.3),
        row(generator, LONG, max_new_tokens=12),
    )
    prompt = torch.tensor([generator.encode(MIDDLE)])
    with torch.inference_mode():
        hf = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.3,
            pad_token_id=reference.config.eos_token_id,
        )
    assert penalized == hf[0, prompt.shape[1] :].tolist()
    assert penalized != decode(generator, row(generator, MIDDLE, max_new_tokens=12))[0]
    assert plain == decode(generator, row(generator, LONG, max_new_tokens=12))[0]


@pytest.fixture(scope="module")
def eos_first(generator: TextGenerator) -> TextGenerator:
    """The stand-in with an output layer whose end-of-text logit dominates every position."""
    model = copy.deepcopy(generator.model)
    head = model.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[generator.tokenizer.eos_token_id] = 1000.0
    model.set_output_embeddings(biased)
    return TextGenerator(model, generator.tokenizer, generator.name, generator.revision, generator.standin)


def test_end_of_text_ends_a_row_unless_it_is_ignored_or_before_min_tokens(eos_first):
    stops, ignores, waits = (
        row(eos_first, MIDDLE, **params) for params in ({}, {"ignore_eos": True}, {"min_tokens": 3})
    )
    decode(eos_first, stops, ignores, waits)
    eos = eos_first.tokenizer.eos_token_id
    assert (stops.finish_reason, eos_first.result(stops).token_ids) == ("stop", [])
    assert ignores.finish_reason == "length" and ignores.tokens == [eos] * 8
    assert len(eos_first.result(ignores).token_ids) == 8
    assert waits.finish_reason == "stop" and len(waits.tokens) == 4 and eos not in waits.tokens[:3]
    assert len(eos_first.result(waits).token_ids) == 3


def test_the_static_path_decodes_extensions_alike_and_stops_abandoned_rows(generator):
    params = GenerationParams(6, logprobs=2, repetition_penalty=1.2)
    prompts = [generator.encode(MIDDLE), generator.encode(SHORT)]
    kept, dropped = generator.generate(prompts, params, abandoned=lambda index: index == 1)
    expected = row(generator, MIDDLE, max_new_tokens=6, logprobs=2, repetition_penalty=1.2)
    decode(generator, expected)
    assert (kept.token_ids, kept.logprobs) == (expected.tokens, expected.logprobs)
    assert dropped.finish_reason == "aborted"

from pathlib import Path

import torch

from server.bench.agreement import Agreement, GreedyReference, label_agreement
from server.ml.classifier import SentimentClassifier
from server.ml.generator import GenerationParams, TextGenerator
from server.ml.loader import locate
from server.ml.offline import build_generator

PROMPTS = ["Once upon a time", "The weather today", "A language model", "The quick brown fox", "I love this"]


def load(cls, directory: Path, precision: str = "fp32"):
    kind = "generator" if cls is TextGenerator else "classifier"
    return cls.load(locate(str(directory), kind, "local", directory.parent), str(directory.parent), precision)


def test_a_generator_agrees_with_itself_on_every_prompt_in_batches_and_alone(standins):
    generator = load(TextGenerator, standins[0])
    greedy = GreedyReference(generator, PROMPTS, new_tokens=6)
    for batch_size in (2, 1):
        agreement = greedy.agreement(generator, batch_size)
        assert agreement == Agreement(len(PROMPTS), len(PROMPTS)) and agreement.share == 1.0


def test_greedy_agreement_counts_the_prompts_whose_continuations_are_identical(standins, tmp_path):
    reference = load(TextGenerator, standins[0])
    other = load(TextGenerator, build_generator(tmp_path / "other", seed=1))
    params = GenerationParams(max_new_tokens=6)
    alone = [
        reference.generate([reference.encode(p)], params)[0].token_ids
        == other.complete([reference.encode(p)], params)[0].token_ids
        for p in PROMPTS
    ]
    agreement = GreedyReference(reference, PROMPTS, new_tokens=6).agreement(other, 1)
    assert agreement == Agreement(sum(alone), len(PROMPTS)) and agreement.identical < len(PROMPTS)
    assert agreement.share == sum(alone) / len(PROMPTS)


class OffByOne:
    """A screen whose pick is the token after the argmax: what a wrong one-row pick would do."""

    def __init__(self, generator: TextGenerator):
        self.head = generator.model.get_output_embeddings()
        self.picks = 0

    def pick(self, hidden: torch.Tensor) -> torch.Tensor:
        self.picks += 1
        return (self.head(hidden).argmax(dim=-1) + 1) % self.head.out_features


def test_the_candidate_runs_our_decoding_loop_whose_lone_rows_the_screen_picks(standins):
    """The candidate's continuations are our loop's, not `generate`'s: a wrong pick by the LM head's screen, which
    picks a lone greedy row's tokens, shows in the count of lone prompts; batches of several rows never use it."""
    reference, candidate = load(TextGenerator, standins[0]), load(TextGenerator, standins[0])
    candidate.decoder.screen = wrong = OffByOne(candidate)  # type: ignore[assignment]
    greedy = GreedyReference(reference, PROMPTS, new_tokens=6)
    assert greedy.agreement(candidate, 5) == Agreement(len(PROMPTS), len(PROMPTS)) and wrong.picks == 0
    assert greedy.agreement(candidate, 1) == Agreement(0, len(PROMPTS)) and wrong.picks == 5 * 6  # every pick


def test_label_agreement_counts_identical_labels(standins):
    reference = load(SentimentClassifier, standins[1])
    assert label_agreement(reference, reference, PROMPTS, batch_size=2) == Agreement(5, 5)
    swapped = load(SentimentClassifier, standins[1])
    swapped.model.config.id2label = {0: "POSITIVE", 1: "NEGATIVE"}
    assert label_agreement(reference, swapped, PROMPTS, batch_size=2) == Agreement(0, 5)

from pathlib import Path

from server.bench.agreement import Agreement, greedy_agreement, label_agreement
from server.ml.classifier import SentimentClassifier
from server.ml.generator import GenerationParams, TextGenerator
from server.ml.loader import locate
from server.ml.offline import build_generator

PROMPTS = ["Once upon a time", "The weather today", "A language model", "The quick brown fox", "I love this"]


def load(cls, directory: Path, precision: str = "fp32"):
    kind = "generator" if cls is TextGenerator else "classifier"
    return cls.load(locate(str(directory), kind, "local", directory.parent), str(directory.parent), precision)


def test_a_generator_agrees_with_itself_on_every_prompt(standins):
    generator = load(TextGenerator, standins[0])
    agreement = greedy_agreement(generator, generator, PROMPTS, new_tokens=6, batch_size=2)
    assert agreement == Agreement(len(PROMPTS), len(PROMPTS)) and agreement.share == 1.0


def test_greedy_agreement_counts_the_prompts_whose_continuations_are_identical(standins, tmp_path):
    reference = load(TextGenerator, standins[0])
    other = load(TextGenerator, build_generator(tmp_path / "other", seed=1))
    params = GenerationParams(max_new_tokens=6)
    alone = [
        reference.generate([reference.encode(p)], params)[0].token_ids
        == other.generate([reference.encode(p)], params)[0].token_ids
        for p in PROMPTS
    ]
    agreement = greedy_agreement(reference, other, PROMPTS, new_tokens=6, batch_size=2)
    assert agreement == Agreement(sum(alone), len(PROMPTS)) and agreement.identical < len(PROMPTS)
    assert agreement.share == sum(alone) / len(PROMPTS)


def test_label_agreement_counts_identical_labels(standins):
    reference = load(SentimentClassifier, standins[1])
    assert label_agreement(reference, reference, PROMPTS, batch_size=2) == Agreement(5, 5)
    swapped = load(SentimentClassifier, standins[1])
    swapped.model.config.id2label = {0: "POSITIVE", 1: "NEGATIVE"}
    assert label_agreement(reference, swapped, PROMPTS, batch_size=2) == Agreement(0, 5)

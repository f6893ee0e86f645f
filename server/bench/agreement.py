"""How often a model served in another precision answers exactly as the fp32 model does (a count, not a timing).

int8 changes outputs; these functions say how much, for docs/precision.md and the benchmark: the share of prompts whose
greedy continuation is token for token the same, and the share of texts given the same sentiment label.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.ml.classifier import SentimentClassifier
from server.ml.generator import GenerationParams, TextGenerator


@dataclass(frozen=True)
class Agreement:
    """`identical` of `total` inputs got the same output from both models."""

    identical: int
    total: int

    @property
    def share(self) -> float:
        return self.identical / self.total


def _agreement(reference: Sequence, candidate: Sequence) -> Agreement:
    return Agreement(sum(r == c for r, c in zip(reference, candidate, strict=True)), len(reference))


def _in_batches(call: Callable[[Sequence], list], inputs: Sequence, batch_size: int) -> list:
    return [
        output for start in range(0, len(inputs), batch_size) for output in call(inputs[start : start + batch_size])
    ]


def greedy_agreement(
    reference: TextGenerator,
    candidate: TextGenerator,
    prompts: Sequence[str],
    *,
    new_tokens: int = 16,
    batch_size: int = 32,
) -> Agreement:
    """Of `prompts`, how many get the same greedy continuation from both generators.

    Each prompt is continued by `new_tokens` greedy tokens (fewer where the end-of-text token comes first), in
    batches of `batch_size` through `TextGenerator.generate`, the server's own code path; two continuations agree
    when their token ids are identical. Both generators must share a tokenizer (the prompts are encoded by
    `reference`). Blocks for the duration of the generation: call it from a thread in async code.
    """
    params = GenerationParams(max_new_tokens=new_tokens)
    encoded = [reference.encode(prompt) for prompt in prompts]

    def continuations(generator: TextGenerator) -> list[list[int]]:
        return [g.token_ids for g in _in_batches(lambda batch: generator.generate(batch, params), encoded, batch_size)]

    return _agreement(continuations(reference), continuations(candidate))


def label_agreement(
    reference: SentimentClassifier, candidate: SentimentClassifier, texts: Sequence[str], *, batch_size: int = 64
) -> Agreement:
    """Of `texts`, how many get the same label from both classifiers (scores may differ), in batches of
    `batch_size` through `SentimentClassifier.classify`. Blocks: call it from a thread in async code."""

    def labels(classifier: SentimentClassifier) -> list[str]:
        return [s.label for s in _in_batches(classifier.classify, texts, batch_size)]

    return _agreement(labels(reference), labels(candidate))

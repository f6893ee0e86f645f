"""How often a model served in another precision answers exactly as the fp32 model does (a count, not a timing).

int8 changes outputs; these say how much, for docs/precision.md and the benchmark: the share of prompts whose greedy
continuation through our decoding loop is token for token transformers' own, and the share of texts given the same
sentiment label.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.ml.classifier import SentimentClassifier
from server.ml.generator import Generation, GenerationParams, TextGenerator


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


class GreedyReference:
    """transformers' greedy continuations of `prompts`, against which generators are counted.

    Each prompt is continued by `new_tokens` greedy tokens (fewer where the end-of-text token comes first): by
    `reference` through transformers' `generate` (`TextGenerator.generate`), and by each candidate through the
    continuous loop's decoder (`TextGenerator.complete`: what the default scheduler serves, its lean decoding step
    and, in a batch of one, the LM head's screen included). Both run in batches of the same size, so that a batch's
    padding is the same on both sides; the reference's continuations are computed once per batch size. Two
    continuations agree when their token ids are identical. The candidates must share the reference's tokenizer
    (the prompts are encoded by it). Blocks for the duration of the generation: call it from a thread in async code.
    """

    def __init__(self, reference: TextGenerator, prompts: Sequence[str], *, new_tokens: int = 16):
        self.reference = reference
        self.encoded = [reference.encode(prompt) for prompt in prompts]
        self.params = GenerationParams(max_new_tokens=new_tokens)
        self._continuations: dict[int, list[list[int]]] = {}

    def _continue(self, call: Callable[..., list[Generation]], batch_size: int) -> list[list[int]]:
        return [g.token_ids for g in _in_batches(lambda batch: call(batch, self.params), self.encoded, batch_size)]

    def agreement(self, candidate: TextGenerator, batch_size: int) -> Agreement:
        """Of the prompts, how many `candidate` continues as the reference does, both in batches of `batch_size`."""
        if batch_size not in self._continuations:
            self._continuations[batch_size] = self._continue(self.reference.generate, batch_size)
        return _agreement(self._continuations[batch_size], self._continue(candidate.complete, batch_size))


def label_agreement(
    reference: SentimentClassifier, candidate: SentimentClassifier, texts: Sequence[str], *, batch_size: int = 64
) -> Agreement:
    """Of `texts`, how many get the same label from both classifiers (scores may differ), in batches of
    `batch_size` through `SentimentClassifier.classify`. Blocks: call it from a thread in async code."""

    def labels(classifier: SentimentClassifier) -> list[str]:
        return [s.label for s in _in_batches(classifier.classify, texts, batch_size)]

    return _agreement(labels(reference), labels(candidate))

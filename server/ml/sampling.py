"""Choosing a row's next token, and the log-probabilities an answer reports, from the model's logits.

Every step is per row: a row's penalties, top-k, EOS rules and sampler read only its own logits and tokens, so a
row's tokens never depend on its batch-mates. The order is that of transformers' `generate` (and vLLM's): the
repetition penalty, then suppressing end-of-text before `min_tokens`, then temperature, top-k, top-p and the draw.
A row that uses none of the extensions (`GenerationParams.shapes_logits` false) takes the exact path it took before
they existed, so its greedy and seeded tokens are unchanged.

Reported log-probabilities are those of the model's own distribution (log-softmax of its logits, before penalties,
temperature and truncation), as OpenAI's and vLLM's (its default `raw_logprobs`) are: what lm-evaluation-harness
scores with.
"""

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.ml.decoding import GenerationParams


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position, and the `top` most likely tokens there (id, log-probability),
    most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    @classmethod
    def at(cls, logprobs: torch.Tensor, token: int, top: int) -> "TokenLogprob":
        """From one position's log-probabilities over the vocabulary."""
        best = torch.topk(logprobs, min(top, logprobs.numel())) if top else None
        alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
        return cls(token, float(logprobs[token]), alternatives)

    def encode(self) -> list:
        return [self.token, self.logprob, [list(pair) for pair in self.top]]

    @classmethod
    def decode(cls, data: list) -> "TokenLogprob":
        token, logprob, top = data
        return cls(token, logprob, tuple((int(t), float(p)) for t, p in top))


class RowSampler:
    """Temperature, top-k and nucleus sampling for one row, from the row's own seeded generator.

    Works in double precision, shifted by the row's maximum: in float32 a tiny temperature rounds to 0 or overflows
    the division to inf, and softmax of inf is NaN. The generator lives on the device of the first scores it draws
    from, so a GPU row samples where its logits are (a seed gives the same tokens in any batch on one device class;
    the CPU's and a GPU's random streams differ)."""

    def __init__(self, params: "GenerationParams", seed: int | None):
        self.params = params
        self.seed = secrets.randbits(63) if seed is None else seed
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """The drawn token id as a 0-d tensor on the scores' device (no copy to the host)."""
        generator = self.generator(scores.device)
        scores = scores.double()
        if 0 < self.params.top_k < scores.numel():
            scores = scores.masked_fill(scores < torch.topk(scores, self.params.top_k).values[-1], float("-inf"))
        probs = torch.softmax((scores - scores.max()) / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.params.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return torch.multinomial(probs, 1, generator=generator)[0]


def penalize_repetition(scores: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """transformers' `RepetitionPenaltyLogitsProcessor` for one row: every token already in the row (prompt and
    generated) has its logit divided by `penalty` when positive, multiplied when negative."""
    index = torch.tensor(seen, dtype=torch.long, device=scores.device)
    picked = scores.gather(0, index)
    return scores.scatter(0, index, torch.where(picked < 0, picked * penalty, picked / penalty))


def shaped(
    scores: torch.Tensor, params: "GenerationParams", seen: list[int], generated: int, eos_token_id: int | None
) -> torch.Tensor:
    """The row's logits after its penalty and its end-of-text rule (`min_tokens`), before temperature."""
    if params.repetition_penalty != 1.0 and seen:
        scores = penalize_repetition(scores, seen, params.repetition_penalty)
    if generated < params.min_tokens and eos_token_id is not None:
        scores = scores.clone()
        scores[eos_token_id] = float("-inf")
    return scores

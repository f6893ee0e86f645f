"""Iteration-level decoding over the HF KV cache: rows join and leave a running batch between steps.

This is the design TGI used for plain HF models. A `DecodeBatch` is a left-padded batch with its past keys and
values. Between decoding steps rows leave (`keep`: select their indices, drop the cache columns no row uses any
more) and join (`extend`: left-pad both caches to one length and concatenate). Each row carries its own attention
mask, position ids (its count of real tokens) and sampler, so its tokens do not depend on its neighbours: the
arithmetic is that of HF's `generate` with left padding, and greedy output is identical to it.

Everything here blocks and mutates tensors: one thread (the scheduler's loop, in the executor) owns a batch.
"""

import copy
import secrets
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Everything that changes a row's tokens besides its prompt and seed.

    `stop` strings end the text before their first occurrence (finish reason "stop"), as OpenAI's `stop` does."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RowSampler:
    """Temperature + nucleus sampling for one row, from the row's own seeded generator.

    Works in double precision, shifted by the row's maximum: in float32 a tiny temperature rounds to 0 or overflows
    the division to inf, and softmax of inf is NaN."""

    def __init__(self, params: GenerationParams, seed: int | None):
        self.params = params
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def pick(self, scores: torch.Tensor) -> int:
        scores = scores.double()
        probs = torch.softmax((scores - scores.max()) / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.params.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass(eq=False)
class Sequence:
    """One row's decoding state: its prompt, the tokens generated so far (the last one not yet fed to the model),
    and, once done, why it stopped and how many of its tokens the answer keeps."""

    prompt: tuple[int, ...]
    params: GenerationParams
    seed: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    kept: int = 0
    sampler: RowSampler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.sampler = RowSampler(self.params, self.seed)


@dataclass(eq=False)
class DecodeBatch:
    """Rows decoded together: `mask` and the cache cover the same columns; `positions[i]` is row i's next position."""

    sequences: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.sequences)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then drop the leading columns that are padding in every remaining row."""
        index = torch.tensor(indices, dtype=torch.long)
        mask = self.mask[index]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions[index]
        self.sequences = [self.sequences[i] for i in indices]

    def split(self, indices: list[int]) -> "DecodeBatch":
        """Move these rows out into a batch of their own (returned, its cache intact); the others stay."""
        moved = DecodeBatch(list(self.sequences), copy.deepcopy(self.cache), self.mask, self.positions)
        moved.keep(indices)
        chosen = set(indices)
        self.keep([i for i in range(len(self)) if i not in chosen])
        return moved

    def extend(self, other: "DecodeBatch") -> None:
        """Append `other`'s rows, left-padding the shorter of the two caches (padding is masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([padded(mine.keys, 2), padded(theirs.keys, 2)])
            mine.values = torch.cat([padded(mine.values, 2), padded(theirs.values, 2)])
        self.mask = torch.cat([padded(self.mask, 1), padded(other.mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.sequences.extend(other.sequences)


class Decoder:
    """Prefill and decoding steps of a causal LM over `DecodeBatch`es; `finish` decides when a row is done."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def prefill(self, sequences: list[Sequence]) -> DecodeBatch:
        """Run each row's prompt (and the tokens it already has: a row resumed alone after a failure) and pick
        its next token."""
        inputs = [list(s.prompt) + s.tokens for s in sequences]
        width = max(map(len, inputs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in inputs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in inputs], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        batch = DecodeBatch(sequences, DynamicCache(config=self.model.config), mask, mask.sum(dim=-1))
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache,
                            use_cache=True, logits_to_keep=1).logits
        self._advance(batch, logits[:, -1, :])
        return batch

    def step(self, batch: DecodeBatch) -> None:
        """Feed every row its last token and pick the next one."""
        ids = torch.tensor([[s.tokens[-1]] for s in batch.sequences], dtype=torch.long)
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=batch.positions.unsqueeze(1),
                            cache=batch.cache, use_cache=True).logits
        batch.mask = mask
        batch.positions = batch.positions + 1
        self._advance(batch, logits[:, -1, :])

    def complete(self, sequences: list[Sequence]) -> None:
        """Decode these rows to their end with nobody joining: the continuous loop's arithmetic for one batch."""
        batch = self.prefill(sequences)
        while unfinished := [i for i, row in enumerate(batch.sequences) if not row.finish_reason]:
            batch.keep(unfinished)
            self.step(batch)

    def _advance(self, batch: DecodeBatch, scores: torch.Tensor) -> None:
        scores = scores.float()
        greedy = scores.argmax(dim=-1).tolist()
        for row, sequence in enumerate(batch.sequences):
            token = greedy[row] if sequence.sampler is None else sequence.sampler.pick(scores[row])
            sequence.tokens.append(token)
            self.finish(sequence)

    def finish(self, sequence: Sequence) -> None:
        """Set `finish_reason` and `kept` once the row is done: end of sequence, a stop string, or its length."""
        tokens = sequence.tokens
        if tokens and tokens[-1] == self.tokenizer.eos_token_id:
            sequence.finish_reason, sequence.kept = "stop", len(tokens) - 1
        elif sequence.params.stop and any(s in self.text(tokens) for s in sequence.params.stop):
            sequence.finish_reason, sequence.kept = "stop", len(tokens)
        elif len(tokens) >= sequence.params.max_new_tokens:
            sequence.finish_reason, sequence.kept = "length", len(tokens)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def answer(self, sequence: Sequence) -> tuple[list[int], str]:
        """The row's kept tokens and its text, cut before the first stop string."""
        tokens = sequence.tokens[:sequence.kept]
        text = self.text(tokens)
        cuts = [text.find(s) for s in sequence.params.stop if s in text]
        return tokens, text[:min(cuts)] if cuts else text

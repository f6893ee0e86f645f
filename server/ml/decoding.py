"""Iteration-level decoding over the HF KV cache: rows join and leave a running batch between steps.

This is the design TGI used for plain HF models. A `DecodeBatch` is a left-padded batch with its past keys and
values. Between decoding steps rows leave (`keep`: select their indices, drop the cache columns no row uses any
more) and join (`extend`: left-pad both caches to one length and concatenate). Each row carries its own attention
mask, position ids (its count of real tokens) and sampler, so its tokens do not depend on its neighbours: the
arithmetic is that of HF's `generate` with left padding, and greedy output is identical to it.

Everything here blocks and mutates tensors: one thread (the scheduler's loop, in the executor) owns a batch.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.ml.decode_step import gpt2_decode_step
from server.ml.sampling import RowSampler, TokenLogprob, shaped
from server.ml.screen import ScreenedHead

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Everything that changes a row's answer besides its prompt and seed.

    `stop` strings end the text before their first occurrence (finish reason "stop"), as OpenAI's `stop` does.
    The extensions of vLLM, TGI and llama.cpp (server/ml/sampling.py): `top_k` (0: off), `repetition_penalty`
    (1.0: off), `min_tokens` (end-of-text is not picked before), `ignore_eos` (end-of-text does not end the row).
    `logprobs` (top alternatives per token; None: none reported) and `prompt_logprobs` change the answer, not
    its tokens."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """Whether the row's pick is the plain argmax of its logits and nothing else reads them (no penalty, no
        sampler, no log-probabilities): such a row may be picked by the LM head's screen (server/ml/screen.py)."""
        return self.greedy and not self.shapes_logits and self.logprobs is None

    @property
    def shapes_logits(self) -> bool:
        """Whether the row's logits change before its pick (else the pick is the plain greedy or sampled one)."""
        return self.repetition_penalty != 1.0 or self.min_tokens > 0


@dataclass(eq=False)
class Sequence:
    """One row's decoding state: its prompt, the tokens generated so far (the last one not yet fed to the model),
    and, once done, why it stopped and how many of its tokens the answer keeps. With `params.logprobs` set,
    `logprobs[i]` is `tokens[i]`'s; with `params.prompt_logprobs`, the prefill sets `prompt_logprobs` (None for
    the first prompt token, which nothing predicts)."""

    prompt: tuple[int, ...]
    params: GenerationParams
    seed: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    kept: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sampler: RowSampler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.params.greedy:
            self.sampler = RowSampler(self.params, self.seed)


S = TypeVar("S", bound=Sequence)


class _LayerTensors(Protocol):
    keys: torch.Tensor
    values: torch.Tensor


def _filled(cache: DynamicCache) -> list[_LayerTensors]:
    """The layers of a batch's cache, which its prefill filled: transformers types them as possibly empty or of
    other kinds (linear attention) than the plain attention layers of the models served here."""
    return cast(list[_LayerTensors], cache.layers)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers with room for `SPARE` more positions.

    `DynamicLayer.update` concatenates, so every decoding step copies the whole cache into a fresh allocation: on
    an Intel Xeon (AVX-512) that was 30% of a batch of 32 rows' time (page faults on the new memory, then the copy).
    Here a step writes its one position into the spare room and the layer's tensors become one position longer
    views; only when the room is used up (or `DecodeBatch` replaced the tensors: rows left or joined) are they
    copied once into new buffers. The values are the same, so is every output.
    """

    SPARE = 64
    keys: torch.Tensor
    values: torch.Tensor
    _written: tuple[torch.Tensor, torch.Tensor] | None
    _buffers: tuple[torch.Tensor, ...]
    _capacity: int

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._written, self._capacity = None, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, added = self.get_seq_length(), key_states.shape[-2]
        if self._written is None or self._written[0] is not self.keys or self._capacity < length + added:
            self._buffers = tuple(
                self._grown(old, new, length, added)
                for old, new in ((self.keys, key_states), (self.values, value_states))
            )
            self._capacity = length + added + self.SPARE
        keys_buffer, values_buffer = self._buffers
        keys_buffer[:, :, length : length + added] = key_states
        values_buffer[:, :, length : length + added] = value_states
        self.keys, self.values = keys_buffer[:, :, : length + added], values_buffer[:, :, : length + added]
        self._written = (self.keys, self.values)
        return self.keys, self.values

    def _grown(self, old: torch.Tensor, new: torch.Tensor, length: int, added: int) -> torch.Tensor:
        batch, heads, _, width = new.shape
        buffer = new.new_empty((batch, heads, length + added + self.SPARE, width))
        if length:
            buffer[:, :, :length] = old
        return buffer


def growing_cache(config) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers grow in place (`GrowingLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass(eq=False)
class DecodeBatch(Generic[S]):
    """Rows decoded together: `mask` and the cache cover the same columns; `positions[i]` is row i's next position."""

    sequences: list[S]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.sequences)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then drop the leading columns that are padding in every remaining row."""
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        # Columns before the first one any remaining row uses: a count summed on the device, one copy to the host.
        first = int((mask.any(dim=0).cumsum(0) == 0).sum())
        for layer in _filled(self.cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions[index]
        self.sequences = [self.sequences[i] for i in indices]

    def split(self, indices: list[int]) -> "DecodeBatch[S]":
        """Move these rows out into a batch of their own (returned, its cache intact); the others stay."""
        moved = DecodeBatch(list(self.sequences), copy.deepcopy(self.cache), self.mask, self.positions)
        moved.keep(indices)
        chosen = set(indices)
        self.keep([i for i in range(len(self)) if i not in chosen])
        return moved

    def extend(self, other: "DecodeBatch[S]") -> None:
        """Append `other`'s rows, left-padding the shorter of the two caches (padding is masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        for mine, theirs in zip(_filled(self.cache), _filled(other.cache), strict=True):
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
        self.device = next(model.parameters()).device
        self.lean_step = gpt2_decode_step(model)
        self.head = model.get_output_embeddings().forward
        # Set by the generator where the screen measured faster than the head (`screen.screened_head`).
        self.screen: ScreenedHead | None = None

    def prefill(self, sequences: list[S]) -> DecodeBatch[S]:
        """Run each row's prompt (and the tokens it already has: a row resumed alone after a failure) and pick
        its next token."""
        inputs = [list(s.prompt) + s.tokens for s in sequences]
        width = max(map(len, inputs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in inputs], dtype=torch.long, device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(row)) + [1] * len(row) for row in inputs], dtype=torch.long, device=self.device
        )
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        batch = DecodeBatch(sequences, growing_cache(self.model.config), mask, mask.sum(dim=-1))
        scoring = [row for row, s in enumerate(sequences) if s.params.prompt_logprobs and s.prompt_logprobs is None]
        # A row scoring its prompt needs the full head over every position (`_score_prompt`).
        screen = None if scoring else self._screen_for(sequences)
        if screen is not None:
            hidden = self.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache, use_cache=True
            ).last_hidden_state
            self._append(batch, screen.pick(hidden[:, -1, :]).tolist(), None)
            return batch
        # Prompt log-probabilities come from the last hidden states of this same pass; the logits the rows pick
        # from stay those of the last position alone, as they are computed without them (a wider product would
        # change their last bits, and so possibly a neighbour's greedy token).
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
            **({"output_hidden_states": True} if scoring else {}),
        )
        for row in scoring:
            self._score_prompt(sequences[row], output.hidden_states[-1][row, width - len(inputs[row]) :])
        self._advance(batch, output.logits[:, -1, :])
        return batch

    def step(self, batch: DecodeBatch[S]) -> None:
        """Feed every row its last token and pick the next one."""
        ids = torch.tensor([[s.tokens[-1]] for s in batch.sequences], dtype=torch.long, device=self.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        positions = batch.positions.unsqueeze(1)
        if self.lean_step is None:
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache, use_cache=True
            ).logits
        else:
            hidden = self.lean_step(ids, mask, positions, batch.cache)
            if (screen := self._screen_for(batch.sequences)) is not None:
                batch.mask, batch.positions = mask, batch.positions + 1
                self._append(batch, screen.pick(hidden[:, -1, :]).tolist(), None)
                return
            logits = self.head(hidden)
        batch.mask = mask
        batch.positions = batch.positions + 1
        self._advance(batch, logits[:, -1, :])

    def _screen_for(self, rows: list[S]) -> ScreenedHead | None:
        """The LM head's screen where it makes the pick: a lone row whose pick is the plain argmax (its prefill and
        its steps); a pass of several rows is a matrix product, which the full head computes faster."""
        return self.screen if len(rows) == 1 and rows[0].params.argmax_only else None

    def complete(self, sequences: list[Sequence], abandoned: Callable[[int], bool] = lambda row: False) -> None:
        """Decode these rows to their end with nobody joining: the continuous loop's arithmetic for one batch. A
        row for which `abandoned(i)` (its index in `sequences`) turns true stops at the next step, unfinished."""
        batch = self.prefill(sequences)
        rows = list(range(len(sequences)))
        while unfinished := [
            i for i, row in enumerate(batch.sequences) if not row.finish_reason and not abandoned(rows[i])
        ]:
            if len(unfinished) < len(batch):
                # `keep` copies every layer's cache: only worth it when a row leaves.
                batch.keep(unfinished)
                rows = [rows[i] for i in unfinished]
            self.step(batch)

    def _score_prompt(self, sequence: Sequence, hidden: torch.Tensor) -> None:
        """The log-probability of each prompt token after the ones before it, from the row's last hidden states."""
        prompt, top = sequence.prompt, sequence.params.logprobs or 0
        sequence.prompt_logprobs = [None]
        if len(prompt) > 1:
            logits = self.model.get_output_embeddings()(hidden[: len(prompt) - 1]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            sequence.prompt_logprobs += [
                TokenLogprob.at(logprobs[i], prompt[i + 1], top) for i in range(len(prompt) - 1)
            ]

    def _advance(self, batch: DecodeBatch, scores: torch.Tensor) -> None:
        """Pick every row's next token on the device (greedy rows by one argmax, the others each from its own
        shaped logits or sampler, written into the same tensor), then copy the picks to the host once."""
        scores = scores.float()
        # The same first index of the largest score as `argmax`, which took 2.5x as long over GPT-2's vocabulary.
        picks = scores.max(dim=-1).indices
        for row, sequence in enumerate(batch.sequences):
            params = sequence.params
            if params.shapes_logits and len(sequence.tokens) < params.max_new_tokens:
                chosen = shaped(
                    scores[row],
                    params,
                    [*sequence.prompt, *sequence.tokens],
                    len(sequence.tokens),
                    self.tokenizer.eos_token_id,
                )
                picks[row] = chosen.argmax() if sequence.sampler is None else sequence.sampler.draw(chosen)
            elif sequence.sampler is not None and len(sequence.tokens) < params.max_new_tokens:
                picks[row] = sequence.sampler.draw(scores[row])
        self._append(batch, picks.tolist(), scores)

    def _append(self, batch: DecodeBatch, tokens: list[int], scores: torch.Tensor | None) -> None:
        """Give every row its picked token, with its log-probabilities where it reports them (from `scores`,
        which only rows that report none may go without: `GenerationParams.argmax_only`)."""
        for row, sequence in enumerate(batch.sequences):
            params = sequence.params
            if len(sequence.tokens) >= params.max_new_tokens:
                # Only a row asked for no new tokens (its prompt scored alone) gets here, at its prefill.
                self.finish(sequence)
                continue
            token = tokens[row]
            if params.logprobs is not None:
                assert scores is not None, "a row that reports log-probabilities is picked from its logits"
                sequence.logprobs.append(
                    TokenLogprob.at(torch.log_softmax(scores[row], dim=-1), token, params.logprobs)
                )
            sequence.tokens.append(token)
            self.finish(sequence)

    def finish(self, sequence: Sequence) -> None:
        """Set `finish_reason` and `kept` once the row is done: end of sequence (unless the row ignores it), a stop
        string, or its length."""
        tokens = sequence.tokens
        if tokens and tokens[-1] == self.tokenizer.eos_token_id and not sequence.params.ignore_eos:
            sequence.finish_reason, sequence.kept = "stop", len(tokens) - 1
        elif sequence.params.stop and any(s in self.text(tokens) for s in sequence.params.stop):
            sequence.finish_reason, sequence.kept = "stop", len(tokens)
        elif len(tokens) >= sequence.params.max_new_tokens:
            sequence.finish_reason, sequence.kept = "length", len(tokens)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def answer(self, sequence: Sequence) -> tuple[list[int], str]:
        """The row's kept tokens and its text, cut before the first stop string."""
        tokens = sequence.tokens[: sequence.kept]
        text = self.text(tokens)
        cuts = [text.find(s) for s in sequence.params.stop if s in text]
        return tokens, text[: min(cuts)] if cuts else text

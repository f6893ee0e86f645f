"""GPT-2 (any causal LM) text generation over a batch of prompts that share one set of parameters.

Batching a decoder-only model is only correct with left padding, pad = eos, and an explicit attention
mask (generate derives position ids from it); see ../../shared/reference/batching.md. Sampling draws
each row from its own seeded `torch.Generator`, so a row's tokens do not depend on its batch-mates.
A row nobody waits for any more stops at the next decoding step (`abandoned`), and when every row has
stopped the call returns: abandoned work never holds the model for the rest of its tokens.
"""

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList,
                          StoppingCriteria, StoppingCriteriaList)

from server.ml.loader import PretrainedModel


@dataclass(frozen=True)
class GenerationParams:
    """Everything that changes a `generate` call. Items with different params never share a call."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length", "aborted"]


class PerRowSampler(LogitsProcessor):
    """Temperature + nucleus sampling with one generator per row; returns scores whose argmax is the sample.

    Running under greedy decoding keeps HF's loop (and its stopping and padding) while making each row's
    draw independent of the other rows, so a seeded request gives the same text in any batch.
    """

    def __init__(self, params: GenerationParams, seeds: Sequence[int]):
        self.params = params
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # In double precision, and shifted by the row's maximum: in float32 a tiny temperature rounds to 0 or
        # overflows the division to inf, and softmax of inf is NaN.
        scores = scores.double()
        probs = torch.softmax((scores - scores.max(dim=-1, keepdim=True).values) / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.params.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        chosen = torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, self.generators)])
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter(-1, chosen.unsqueeze(-1), 0.0)


class AbandonedRows(StoppingCriteria):
    """Stops each row whose `abandoned(row)` turned true; generate ends once every row has stopped."""

    def __init__(self, abandoned: Callable[[int], bool], rows: int):
        self.abandoned = abandoned
        self.stopped = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        now = torch.tensor([self.abandoned(row) for row in range(len(self.stopped))], dtype=torch.bool)
        self.stopped |= now
        return now


class TextGenerator(PretrainedModel):
    """A loaded causal LM and its tokenizer. `generate` blocks: call it from the executor only."""

    auto_class = AutoModelForCausalLM

    def __init__(self, model, tokenizer, name: str, revision: str, standin: bool):
        super().__init__(model, tokenizer, name, revision, standin)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.context_size = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams,
                 seeds: Sequence[int | None] | None = None,
                 abandoned: Callable[[int], bool] = lambda row: False) -> list[Generation]:
        """Continue each tokenised prompt; `seeds[i]` fixes row i's sample (None: a fresh random seed).

        Rows for which `abandoned(i)` becomes true stop at the next step and come back as `finish_reason="aborted"`.
        """
        batch = self.tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos)
        processors = LogitsProcessorList()
        if not params.greedy:
            row_seeds = [secrets.randbits(63) if s is None else s for s in (seeds or [None] * len(prompts))]
            processors.append(PerRowSampler(params, row_seeds))
        aborts = AbandonedRows(abandoned, len(prompts))
        with torch.inference_mode():
            output = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         generation_config=config, logits_processor=processors,
                                         stopping_criteria=StoppingCriteriaList([aborts]))
        results = []
        for row, aborted in zip(output[:, batch["input_ids"].shape[1]:].tolist(), aborts.stopped.tolist()):
            if aborted:
                results.append(Generation([], "", "aborted"))
                continue
            stop = row.index(eos) if eos in row else None
            tokens = row if stop is None else row[:stop]
            results.append(Generation(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True),
                                      "length" if stop is None else "stop"))
        return results

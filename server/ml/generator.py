"""GPT-2 (any causal LM) text generation: the model, its tokenizer, and a static batch through HF's `generate`.

Continuous batching drives `decoder` (server/ml/decoding.py) instead; both pick tokens and finish rows alike.

Batching a decoder-only model is only correct with left padding, pad = eos, and an explicit attention
mask (generate derives position ids from it). Sampling draws
each row from its own seeded `torch.Generator`, so a row's tokens do not depend on its batch-mates.
A row nobody waits for any more stops at the next decoding step (`abandoned`), and when every row has
stopped the call returns: abandoned work never holds the model for the rest of its tokens.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from server.ml.decoding import Decoder, GenerationParams
from server.ml.decoding import Sequence as DecodedSequence
from server.ml.loader import PretrainedModel
from server.ml.sampling import RowSampler, TokenLogprob
from server.ml.screen import screened_head


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length", "aborted"]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class PerRowSampler(LogitsProcessor):
    """Each row's `RowSampler` under HF's greedy loop: returns scores whose argmax is the row's sample.

    Running under greedy decoding keeps HF's loop (and its stopping and padding) while making each row's
    draw independent of the other rows, so a seeded request gives the same text in any batch.
    """

    def __init__(self, params: GenerationParams, seeds: Sequence[int | None]):
        self.samplers = [RowSampler(params, seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = torch.stack([sampler.draw(row) for row, sampler in zip(scores, self.samplers, strict=True)])
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
        # transformers annotates BoolTensor, a legacy type that no torch operation is typed to return.
        return cast(torch.BoolTensor, now.to(input_ids.device))


def _decoder_only(params: GenerationParams) -> bool:
    return (
        params.shapes_logits
        or params.ignore_eos
        or params.logprobs is not None
        or params.prompt_logprobs
        or params.max_new_tokens == 0
    )


class TextGenerator(PretrainedModel):
    """A loaded causal LM and its tokenizer. `generate` blocks: call it from the executor only."""

    auto_class = AutoModelForCausalLM
    # transformers' default for GPT-2 already, named so that every architecture loaded here attends through
    # torch's fused kernels (flash or memory-efficient on a GPU) rather than an eager softmax.
    attention = "sdpa"

    def _ready(self) -> None:
        tokenizer, model = self.tokenizer, self.model
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.context_size = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.decoder = Decoder(self.model, tokenizer)
        if self.precision == "fp32" and self.decoder.lean_step is not None:
            # A real hidden state to time the screen on: its candidates, so its time, depend on one.
            ids = torch.tensor([[tokenizer.eos_token_id or 0]], device=self.decoder.device)
            with torch.inference_mode():
                hidden = self.model.base_model(input_ids=ids).last_hidden_state[:, -1, :]
            self.decoder.screen, self.head_screen = screened_head(self.model, hidden)
        else:
            self.head_screen = "off: only for a float32 GPT-2 on the CPU (the lean decoding step)"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        seeds: Sequence[int | None] | None = None,
        abandoned: Callable[[int], bool] = lambda row: False,
    ) -> list[Generation]:
        """One static batch through HF's `generate`: every row runs until the longest is done (the static
        scheduler). `seeds[i]` fixes row i's sample (None: a fresh random seed). Rows for which `abandoned(i)`
        becomes true stop at the next step and come back as `finish_reason="aborted"`. Parameters HF's loop does
        not apply as the continuous one does (penalties, end-of-text rules, log-probabilities, no new tokens) run
        the continuous loop's decoder on this batch instead."""
        if _decoder_only(params):
            return self.complete(prompts, params, seeds, abandoned)
        batch = self.tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt").to(
            self.device
        )
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        processors = LogitsProcessorList()
        if not params.greedy:
            processors.append(PerRowSampler(params, seeds or [None] * len(prompts)))
        aborts = AbandonedRows(abandoned, len(prompts))
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([aborts]),
            )
        results = []
        for prompt, row, aborted in zip(
            prompts, output[:, batch["input_ids"].shape[1] :].tolist(), aborts.stopped.tolist(), strict=True
        ):
            if aborted:
                results.append(Generation([], "", "aborted"))
                continue
            sequence = DecodedSequence(tuple(prompt), params)
            for token in row:
                sequence.tokens.append(token)
                self.decoder.finish(sequence)
                if sequence.finish_reason:
                    break
            results.append(self.result(sequence))
        return results

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        seeds: Sequence[int | None] | None = None,
        abandoned: Callable[[int], bool] = lambda row: False,
    ) -> list[Generation]:
        """One batch through the continuous loop's decoder (`decoding.Decoder.complete`: the default scheduler's
        arithmetic, its lean decoding step and the LM head's screen included), nobody joining; as `generate` takes
        `seeds` and `abandoned`."""
        seeds = seeds or [None] * len(prompts)
        sequences = [DecodedSequence(tuple(prompt), params, seed) for prompt, seed in zip(prompts, seeds, strict=True)]
        with torch.inference_mode():
            self.decoder.complete(sequences, abandoned)
        return [self.result(s) if s.finish_reason else Generation([], "", "aborted") for s in sequences]

    def result(self, sequence: DecodedSequence) -> Generation:
        tokens, text = self.decoder.answer(sequence)
        params = sequence.params
        return Generation(
            tokens,
            text,
            sequence.finish_reason or "length",
            sequence.logprobs[: len(tokens)] if params.logprobs is not None else None,
            sequence.prompt_logprobs,
        )

    def chat_prompt(self, messages: list[dict[str, str]]) -> str | None:
        """The prompt for a chat, from the tokenizer's chat template; None when the model has none (GPT-2)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

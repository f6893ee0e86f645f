"""One decoding step of GPT-2 (one new token per row) without transformers' per-call machinery.

A decoding step's arithmetic is small: a lone request's step reads every weight once, one of 32 rows does 8 GFLOP.
Around it `GPT2LMHeadModel.forward` builds the attention mask (`create_causal_mask`), checks and routes its arguments,
dispatches the attention through its registry and wraps every output in a dataclass, layer by layer: 2 ms of a 25 ms
fp32 step for a lone request on an Intel Xeon (AVX-512), 1.4 ms of a 10.5 ms int8 one, 2.7 ms of a 30 ms int8 step for
32 rows. `gpt2_decode_step` runs the same modules and the same torch ops in the same order on the same tensors, up to
the LM head, which the decoder applies, so its logits are bit for bit the model's own (tests/ml/test_decode_step.py
compares them, in float32, bfloat16 and int8, with and without padding); everything else is left out. That includes
`nn.Module`'s call machinery around each layer norm, Linear and activation (their `forward` is called), the eval-mode
dropouts (which return their input), and so every forward hook of the model and of those modules, apart from the two
embeddings'. On an AMD EPYC Zen 4 that, with int8's direct op call (`precision.Int8Linear`), took a lone 16-token
request offline from 153 to 141 ms in int8, 417 to 403 in fp32 and 241 to 235 in bfloat16 (medians of 36 runs, old and
new interleaved in one process).

It is used only where that holds by construction: a GPT-2 in eval mode, on the CPU, with transformers' `sdpa`
attention and no cross-attention. Anything else (another architecture, a GPU, whose attention kernels transformers
may call with another mask) keeps the model's own forward. The prefill always does: it needs the causal mask over
the prompt, the hidden states for prompt log-probabilities and `logits_to_keep`, once per request.
"""

from collections.abc import Callable
from typing import cast

import torch
from torch.nn import functional
from transformers import DynamicCache, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

# (last tokens [rows, 1], attention mask [rows, columns], positions [rows, 1], cache) -> the hidden states after the
# final norm [rows, 1, width], what the LM head takes (the decoder applies it: server/ml/screen.py may stand in)
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


def gpt2_decode_step(model: torch.nn.Module) -> DecodeStep | None:
    """The lean step for `model`, or None where its own forward must run (see the module's docstring)."""
    if type(model) is not GPT2LMHeadModel:
        return None
    gpt2 = cast(GPT2LMHeadModel, model)
    config = gpt2.config
    if (
        gpt2.training
        or gpt2.device.type != "cpu"
        or config._attn_implementation != "sdpa"
        or config.add_cross_attention
    ):
        return None
    transformer = gpt2.transformer
    layers = [
        (
            block.ln_1.forward,
            block.attn.c_attn.forward,
            block.attn.c_proj.forward,
            block.ln_2.forward,
            block.mlp.c_fc.forward,
            block.mlp.act.forward,
            block.mlp.c_proj.forward,
            block.attn,
        )
        for block in cast(list[GPT2Block], list(transformer.h))
    ]
    final_norm = transformer.ln_f.forward

    def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        rows = ids.shape[0]
        hidden = transformer.wte(ids) + transformer.wpe(positions)
        # With one query per row every column up to it is causal: the mask is the padding alone, and none where
        # there is none, as transformers' `sdpa_mask` gives it.
        padding = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        for index, (ln_1, c_attn, c_proj, ln_2, c_fc, act, mlp_proj, attention) in enumerate(layers):
            query, key, value = c_attn(ln_1(hidden)).split(attention.split_size, dim=2)
            query, key, value = (t.view(rows, 1, -1, attention.head_dim).transpose(1, 2) for t in (query, key, value))
            key, value = cache.update(key, value, index)
            attended = functional.scaled_dot_product_attention(
                query, key, value, attn_mask=padding, dropout_p=0.0, scale=attention.scaling, is_causal=False
            )
            hidden = c_proj(attended.transpose(1, 2).reshape(rows, 1, -1)) + hidden
            hidden = hidden + mlp_proj(act(c_fc(ln_2(hidden))))
        return final_norm(hidden)

    return step

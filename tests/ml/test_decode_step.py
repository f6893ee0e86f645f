import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.ml.decode_step import gpt2_decode_step
from server.ml.decoding import GenerationParams, Sequence
from server.ml.device import Placement
from server.ml.generator import TextGenerator
from server.ml.loader import locate
from tests.ml.conftest import LONG, MIDDLE, SHORT


def load(standins, cache, precision: str, kernels: str, dtype: torch.dtype) -> TextGenerator:
    """The stand-in, its kernel timings kept in `cache` (the shared one would answer other tests' injected ones)."""
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    return TextGenerator.load(location, str(cache), precision, kernels, Placement(torch.device("cpu"), dtype))


@pytest.mark.parametrize(
    "precision, kernels, dtype",
    [
        ("fp32", "torch", torch.float32),
        ("fp32", "onednn", torch.float32),
        ("int8", "torch", torch.float32),
        ("fp32", "auto", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("prompts", [[LONG, MIDDLE, SHORT], [MIDDLE]], ids=["padded", "unpadded"])
def test_the_lean_step_gives_the_models_own_logits_bit_for_bit(standins, tmp_path, precision, kernels, dtype, prompts):
    generator = load(standins, tmp_path, precision, kernels, dtype)
    decoder = generator.decoder
    assert decoder.lean_step is not None
    params = GenerationParams(max_new_tokens=12)
    with torch.inference_mode():
        ours, theirs = (decoder.prefill([Sequence(tuple(generator.encode(p)), params) for p in prompts]) for _ in "ab")
        for _ in range(8):
            ids = torch.tensor([[s.tokens[-1]] for s in ours.sequences])
            mask = torch.cat([ours.mask, ours.mask.new_ones((len(ours), 1))], dim=1)
            positions = ours.positions.unsqueeze(1)
            lean = decoder.head(decoder.lean_step(ids, mask, positions, ours.cache))
            own = decoder.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=theirs.cache, use_cache=True
            ).logits
            assert torch.equal(lean, own)
            for batch in (ours, theirs):
                batch.mask, batch.positions = mask, batch.positions + 1
                for sequence, token in zip(batch.sequences, own[:, -1].argmax(-1).tolist(), strict=True):
                    sequence.tokens.append(token)


def test_a_model_whose_forward_differs_keeps_its_own(standins):
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    gpt2 = AutoModelForCausalLM.from_pretrained(location.path, attn_implementation="sdpa")
    assert gpt2_decode_step(gpt2.eval()) is not None
    assert gpt2_decode_step(copy.deepcopy(gpt2).train()) is None
    eager = AutoModelForCausalLM.from_pretrained(location.path, attn_implementation="eager")
    assert gpt2_decode_step(eager.eval()) is None
    llama = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    assert gpt2_decode_step(AutoModelForCausalLM.from_config(llama).eval()) is None

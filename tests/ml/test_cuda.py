"""The GPU path: skipped without CUDA (CI is CPU-only); `scripts/gpu-check.sh` runs these on a GPU machine."""

from pathlib import Path

import pytest
import torch

from server.ml.decoding import GenerationParams, Sequence
from server.ml.device import Placement, default_batch_max_size, memory, resolve
from server.ml.generator import TextGenerator
from server.ml.loader import locate
from tests.support.app import serving

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [
    "The cat",
    "Once upon a time there was a small village",
    "The stock market rose sharply on Tuesday after",
    "In the beginning",
    "A quiet harbour at dawn, where the fishermen",
]


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def on_gpu(request, standins: tuple[Path, Path]) -> TextGenerator:
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    placement = resolve("GENERATOR", "cuda", request.param, "fp32", "auto")
    return TextGenerator.load(location, str(standins[0].parent), "fp32", "torch", placement)


def test_weights_and_every_decoding_tensor_live_on_the_gpu(on_gpu):
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    with torch.inference_mode():
        batch = on_gpu.decoder.prefill([Sequence(tuple(on_gpu.encode(p)), GenerationParams(4)) for p in PROMPTS])
        on_gpu.decoder.step(batch)
    assert {batch.mask.device.type, batch.positions.device.type} == {"cuda"}
    assert all(layer.keys.device.type == "cuda" for layer in batch.cache.layers)
    assert batch.cache.layers[0].keys.dtype == on_gpu.placement.dtype


def test_greedy_output_is_transformers_generate_in_the_same_dtype(on_gpu):
    params = GenerationParams(max_new_tokens=12)
    prompts = [on_gpu.encode(p) for p in PROMPTS]
    reference = on_gpu.generate(prompts, params)
    sequences = [Sequence(tuple(p), params) for p in prompts]
    with torch.inference_mode():
        on_gpu.decoder.complete(sequences)
    assert [on_gpu.result(s).token_ids for s in sequences] == [r.token_ids for r in reference]


def test_a_seeded_row_samples_the_same_alone_and_in_a_batch_on_the_gpu(on_gpu):
    params = GenerationParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=40)
    prompts = [tuple(on_gpu.encode(p)) for p in PROMPTS]
    alone = Sequence(prompts[0], params, seed=7)
    together = [Sequence(p, params, seed=7 if i == 0 else i) for i, p in enumerate(prompts)]
    with torch.inference_mode():
        on_gpu.decoder.complete([alone])
        on_gpu.decoder.complete(together)
    assert alone.tokens == together[0].tokens


def test_the_gpu_default_batch_size_comes_from_free_memory(on_gpu):
    size = default_batch_max_size(on_gpu.placement, on_gpu.model.config)
    assert 1 <= size <= 256
    seen = memory(on_gpu.device)
    assert seen["device"].startswith("cuda:") and seen["memory_free_bytes"] > 0


def test_auto_picks_the_gpu_and_bfloat16_where_it_computes_it():
    placement = resolve("GENERATOR", "auto", "auto", "fp32", "auto")
    assert placement.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert placement == Placement(placement.device, expected)


async def test_the_server_answers_from_the_gpu_and_names_it(settings):
    async with serving(settings.model_copy(update={"device": "cuda"})) as client:
        generated = await client.post("/generate", json={"prompts": ["Once upon a time"], "max_new_tokens": 4})
        root = (await client.get("/")).json()
        health = (await client.get("/health")).json()
    dtype = resolve("GENERATOR", "cuda", "auto", "fp32", "auto").dtype_name
    assert generated.status_code == 200
    assert generated.json()[0]["model_name"] == f"offline-stand-in:gpt2:cuda:{dtype}"
    assert root["models"]["generator"]["device"].startswith("cuda:")
    [device] = root["devices"]
    assert device.startswith("cuda:") and health["checks"]["devices"]["detail"][device]["memory_free_bytes"] > 0


def test_a_real_out_of_memory_fails_the_forward_and_leaves_the_gpu_usable(on_gpu):
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        torch.empty(free * 2, dtype=torch.uint8, device=on_gpu.device)
    [out] = on_gpu.generate([on_gpu.encode("still here")], GenerationParams(max_new_tokens=3))
    assert out.token_ids

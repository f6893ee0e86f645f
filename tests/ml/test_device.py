"""Device and dtype selection, the refusals, and the names and cache keys they give, all checkable on the CPU."""

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from server.ml import device, kernels
from server.ml.decoding import GenerationParams
from server.ml.device import (
    CPU_BATCH_MAX_SIZE,
    CPU_FLOAT32,
    GPU_BATCH_MAX_SIZE,
    DeviceRefused,
    Placement,
    default_batch_max_size,
    kernels_for,
    memory,
    resolve,
    resolve_device,
    resolve_dtype,
    row_bytes,
)
from server.ml.generator import TextGenerator
from server.ml.loader import locate
from server.ml.precision import OneDnnLinear
from server.services.cache.keys import cache_key

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU does")
CUDA_BF16 = Placement(torch.device("cuda", 0), torch.bfloat16)


@pytest.fixture(scope="module")
def loaded(standins: tuple[Path, Path]) -> TextGenerator:
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    return TextGenerator.load(location, str(standins[0].parent))


@no_gpu
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    assert resolve("GENERATOR", "auto", "auto", "fp32", "auto") == CPU_FLOAT32
    assert resolve("GENERATOR", "auto", "auto", "int8", "onednn") == CPU_FLOAT32


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_is_refused_in_one_line_where_torch_has_none(device):
    with pytest.raises(DeviceRefused, match=rf"^DEVICE={device} but this torch .* set DEVICE=cpu$"):
        resolve_device(device)


def test_an_unknown_device_is_refused():
    with pytest.raises(DeviceRefused, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_float16_is_refused_on_the_cpu():
    with pytest.raises(DeviceRefused, match="GENERATOR_DTYPE=float16 is refused on the CPU"):
        resolve("GENERATOR", "cpu", "float16", "fp32", "torch")


@pytest.mark.parametrize("flags", [[], ["avx2", "fma"], ["avx512f", "avx512_vnni"]])
def test_bfloat16_is_refused_on_a_cpu_without_bf16_units(monkeypatch, flags):
    monkeypatch.setattr(device, "cpu_model_and_flags", lambda: ("Some CPU", flags))
    with pytest.raises(DeviceRefused) as refused:
        resolve("SENTIMENT", "cpu", "bfloat16", "fp32", "auto")
    assert str(refused.value).startswith("SENTIMENT_DTYPE=bfloat16 needs a CPU with AVX512-BF16 or AMX")
    assert f"(Some CPU: {', '.join(flags) or 'no AVX'})" in str(refused.value)


@pytest.mark.parametrize("flags", [["avx512f", "avx512_bf16"], ["amx_tile", "amx_bf16"]])
def test_bfloat16_is_opt_in_on_a_cpu_with_bf16_units(monkeypatch, flags):
    monkeypatch.setattr(device, "cpu_model_and_flags", lambda: ("Some Xeon", flags))
    assert resolve("GENERATOR", "cpu", "bfloat16", "fp32", "auto") == Placement(torch.device("cpu"), torch.bfloat16)
    assert resolve("GENERATOR", "cpu", "auto", "fp32", "auto") == CPU_FLOAT32


def test_cpu_dtypes_resolve_to_float32_unless_named():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16


def test_kernels_auto_are_measured_on_the_cpu_and_torch_on_a_gpu():
    assert kernels_for("auto", CPU_FLOAT32) == "auto"
    assert kernels_for("auto", CUDA_BF16) == "torch"
    assert kernels_for("torch", CPU_FLOAT32) == "torch"


def test_only_outputs_that_can_differ_get_a_suffix():
    assert CPU_FLOAT32.suffix == ""
    assert CUDA_BF16.suffix == ":cuda:bfloat16"
    assert Placement(torch.device("cuda", 1), torch.float32).suffix == ":cuda:float32"
    assert Placement(torch.device("cpu"), torch.bfloat16).suffix == ":cpu:bfloat16"


def test_a_gpu_model_names_itself_and_keys_its_answers_apart(loaded):
    on_gpu = TextGenerator(loaded.model, loaded.tokenizer, "gpt2", "abc123", False, placement=CUDA_BF16)
    on_cpu = TextGenerator(loaded.model, loaded.tokenizer, "gpt2", "abc123", False)
    assert (on_gpu.name, on_gpu.revision) == ("gpt2:cuda:bfloat16", "abc123:cuda:bfloat16")
    assert (on_cpu.name, on_cpu.revision) == ("gpt2", "abc123")
    keys = {cache_key("generate", m.name, m.revision, [1, 2, 3], {}, None) for m in (on_gpu, on_cpu)}
    assert len(keys) == 2


def test_a_model_loaded_in_another_dtype_computes_in_it_and_says_so(standins):
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    model = TextGenerator.load(location, str(standins[0].parent), placement=placement)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert model.name.endswith(":cpu:bfloat16") and model.revision.endswith(":cpu:bfloat16")
    assert model.model.config._attn_implementation == "sdpa"
    [out] = model.generate([model.encode("Once upon a time")], GenerationParams(max_new_tokens=4))
    assert len(out.token_ids) <= 4


def test_the_default_batch_size_is_32_on_the_cpu():
    assert default_batch_max_size(CPU_FLOAT32, GPT2Config()) == CPU_BATCH_MAX_SIZE == 32


def test_a_row_holds_its_full_context_of_keys_and_values_and_its_logits():
    config = GPT2Config()  # GPT-2 124M: 12 layers, 768 wide, 1024 positions, 50257 tokens
    assert row_bytes(config, torch.bfloat16) == 2 * 12 * 768 * 1024 * 2 + 4 * 50257
    assert GPU_BATCH_MAX_SIZE == 256


def test_cpu_memory_is_the_systems():
    seen = memory(torch.device("cpu"))
    assert seen["device"] == "cpu"
    assert 0 < seen["memory_free_bytes"] <= seen["memory_total_bytes"]
    assert seen["memory_used_bytes"] == seen["memory_total_bytes"] - seen["memory_free_bytes"]


def test_auto_kernels_in_bfloat16_are_measured_in_bfloat16_where_onednn_computes_it(standins, monkeypatch, tmp_path):
    seen = []

    def measure(shapes, rows, precision, dtype):
        seen.append(dtype)
        return {shape: {n: {"torch": 2.0, "onednn": 1.0} for n in rows} for shape in shapes}

    monkeypatch.setattr(kernels, "measure", measure)
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    # Its own kernel cache: injected timings must neither meet other tests' nor be left to them.
    model = TextGenerator.load(location, str(tmp_path), "fp32", "auto", placement)
    assert seen == [torch.bfloat16]
    assert model.kernels == "onednn" and model.kernels_reason.startswith("bfloat16: oneDNN where it beat")
    packed = [m for m in model.model.modules() if isinstance(m, OneDnnLinear)]
    assert packed and all(m.packed_weight.dtype == torch.bfloat16 for m in packed)
    [out] = model.generate([model.encode("Once")], GenerationParams(max_new_tokens=3))
    assert len(out.token_ids) <= 3


def test_auto_kernels_in_bfloat16_are_torch_s_where_onednn_has_no_bf16_kernels(standins, monkeypatch):
    def no_measuring(*_):
        raise AssertionError("kernels measured for a dtype oneDNN does not compute")

    monkeypatch.setattr(kernels, "measure", no_measuring)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    model = TextGenerator.load(location, str(standins[0].parent), "fp32", "auto", placement)
    assert model.kernels == "torch" and "bfloat16" in model.kernels_reason
    [out] = model.generate([model.encode("Once")], GenerationParams(max_new_tokens=3))
    assert len(out.token_ids) <= 3

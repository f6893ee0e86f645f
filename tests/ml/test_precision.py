import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

from server.ml.classifier import SentimentClassifier
from server.ml.decoding import GenerationParams, Sequence
from server.ml.generator import TextGenerator
from server.ml.loader import locate
from server.ml.precision import (
    Int8Linear,
    OneDnnLinear,
    OneRowApart,
    apply_precision,
    fuse_gelu,
    int8_engines_available,
    linear_from_conv1d,
    quantize_linear_int8,
    quantized_engine,
)
from tests.ml.conftest import LONG, MIDDLE, SHORT

PROMPTS = ["Once upon a time", "The weather today is", "A"]


def load(cls, directory: Path, precision: str):
    kind = "generator" if cls is TextGenerator else "classifier"
    return cls.load(locate(str(directory), kind, "local", directory.parent), str(directory.parent), precision)


def logits(model: nn.Module, directory: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits


def test_conv1d_becomes_linear_with_bit_identical_fp32_outputs(standins):
    original = AutoModelForCausalLM.from_pretrained(standins[0]).eval()
    converted = AutoModelForCausalLM.from_pretrained(standins[0]).eval()
    conv1d_count = sum(isinstance(m, Conv1D) for m in converted.modules())
    linear_from_conv1d(converted)
    assert conv1d_count == 4 * converted.config.n_layer
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    assert sum(isinstance(m, nn.Linear) for m in converted.modules()) == conv1d_count + 1
    assert torch.equal(logits(converted, standins[0]), logits(original, standins[0]))


def test_int8_generator_quantizes_every_projection_and_the_lm_head_and_keeps_the_embedding(standins):
    fp32 = load(TextGenerator, standins[0], "fp32").model
    int8 = load(TextGenerator, standins[0], "int8").model
    assert any(isinstance(m, Conv1D) for m in fp32.modules()), "fp32 serves the model as trained"
    # Where our int8 kernel takes one row, the quantized layer is the `rows` of a `OneRowApart`.
    quantized = [n.removesuffix(".rows") for n, m in int8.named_modules() if isinstance(m, DynamicQuantizedLinear)]
    assert len(quantized) == 4 * int8.config.n_layer + 1 and "lm_head" in quantized
    assert not any(isinstance(m, (Conv1D, nn.Linear)) for m in int8.modules())
    assert int8.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(int8.transformer.wte.weight, fp32.transformer.wte.weight)
    int8.tie_weights()
    head = int8.lm_head.rows if isinstance(int8.lm_head, OneRowApart) else int8.lm_head
    assert isinstance(head, DynamicQuantizedLinear)
    assert not any(name.startswith("lm_head") for name, _ in int8.named_parameters())
    assert not torch.equal(logits(int8, standins[0]), logits(fp32, standins[0]))


def test_int8_computes_gpt2_s_gelu_in_one_call_of_the_same_formula(standins):
    fp32 = load(TextGenerator, standins[0], "fp32").model
    int8 = load(TextGenerator, standins[0], "int8").model
    assert {type(block.mlp.act) for block in fp32.transformer.h} == {NewGELUActivation}
    assert {type(block.mlp.act) for block in int8.transformer.h} == {GELUTanh}
    x = torch.randn(4, 3072)
    assert torch.allclose(GELUTanh()(x), NewGELUActivation()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
@pytest.mark.parametrize("rows", [1, 7])
def test_int8_linear_calls_torch_s_op_and_gives_its_bits(engine, rows):
    if not int8_engines_available():
        pytest.skip("this torch build has one quantized engine")
    linear = nn.Linear(96, 40)
    ours = quantize_linear_int8(nn.Sequential(copy.deepcopy(linear)), onednn={(96, 40)} if engine == "onednn" else ())
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        qconfig = {nn.Linear: per_channel_dynamic_qconfig}
        torch_s = quantize_dynamic(nn.Sequential(linear), qconfig, dtype=torch.qint8)
    assert type(ours[0]) is Int8Linear and type(torch_s[0]) is DynamicQuantizedLinear
    x = torch.randn(rows, 96) * 3
    with torch.inference_mode():
        assert torch.equal(ours(x), torch_s(x))


def test_int8_classifier_quantizes_every_linear_layer(standins):
    int8 = load(SentimentClassifier, standins[1], "int8")
    assert not any(isinstance(m, nn.Linear) for m in int8.model.modules())
    quantized = [name for name, m in int8.model.named_modules() if isinstance(m, DynamicQuantizedLinear)]
    assert len(quantized) == 6 * int8.model.config.n_layers + 2
    assert {"pre_classifier", "classifier"} <= set(quantized)
    assert len(answers := int8.classify(["great", "awful"])) == 2
    assert {s.label for s in answers} <= {"NEGATIVE", "POSITIVE"}


@pytest.mark.parametrize("cls", [TextGenerator, SentimentClassifier])
def test_the_precision_is_in_the_name_and_in_the_revision_that_cache_keys_use(standins, cls):
    directory = standins[0] if cls is TextGenerator else standins[1]
    fp32, int8 = load(cls, directory, "fp32"), load(cls, directory, "int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert fp32.name.startswith("offline-stand-in:") and ":int8" not in fp32.name
    assert int8.name == f"{fp32.name}:int8"
    assert fp32.revision == fp32.checkpoint_revision == int8.checkpoint_revision
    assert int8.revision == f"{fp32.revision}:int8"


def test_an_unknown_precision_is_refused(standins):
    model = AutoModelForCausalLM.from_pretrained(standins[0])
    with pytest.raises(ValueError, match="expected one of fp32, int8"):
        apply_precision(model, "int4")


def test_the_onednn_fp32_path_gives_transformers_greedy_output_alone_and_batched(standins):
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    reference = TextGenerator.load(location, str(standins[0].parent))
    fast = TextGenerator.load(location, str(standins[0].parent), "fp32", "onednn")
    assert fast.kernels == "onednn" and fast.name == reference.name and fast.revision == reference.revision
    assert all(type(m) is not nn.Linear and not isinstance(m, Conv1D) for m in fast.model.modules())
    params = GenerationParams(max_new_tokens=12)
    prompts = [reference.encode(p) for p in (*PROMPTS, LONG, MIDDLE, SHORT)]
    expected = [reference.generate([p], params)[0] for p in prompts]
    assert fast.generate(prompts, params) == expected
    assert [fast.generate([p], params)[0] for p in prompts] == expected
    rows = [Sequence(tuple(p), params) for p in prompts]
    with torch.inference_mode():
        fast.decoder.complete(rows)
    assert [fast.result(s) for s in rows] == expected


def test_the_onednn_fp32_classifier_gives_transformers_labels_and_scores(standins):
    location = locate(str(standins[1]), "classifier", "local", standins[1].parent)
    reference = SentimentClassifier.load(location, str(standins[1].parent))
    fast = SentimentClassifier.load(location, str(standins[1].parent), "fp32", "onednn")
    assert fast.kernels == "onednn" and fast.name == reference.name and fast.revision == reference.revision
    assert not any(type(m) is nn.Linear for m in fast.model.modules())
    texts = [*PROMPTS, LONG, MIDDLE, SHORT]
    for batch in [[t] for t in texts] + [texts]:
        expected, got = reference.classify(batch), fast.classify(batch)
        assert [s.label for s in got] == [s.label for s in expected]
        assert [s.score for s in got] == pytest.approx([s.score for s in expected], abs=1e-5)


def test_a_torch_build_without_onednn_serves_on_torch_kernels_and_says_so(standins, monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    generator = TextGenerator.load(location, str(standins[0].parent), "fp32", "onednn")
    assert generator.kernels == "torch" and any(isinstance(m, Conv1D) for m in generator.model.modules())
    assert "has no oneDNN" in caplog.text


def test_the_gelu_after_a_feed_forward_linear_runs_inside_its_onednn_call(standins):
    generator = TextGenerator.load(
        locate(str(standins[0]), "generator", "local", standins[0].parent), str(standins[0].parent), "fp32", "onednn"
    )
    classifier = SentimentClassifier.load(
        locate(str(standins[1]), "classifier", "local", standins[1].parent), str(standins[1].parent), "fp32", "onednn"
    )
    blocks = [m for m in generator.model.modules() if hasattr(m, "c_fc")]
    ffns = [m for m in classifier.model.modules() if hasattr(m, "lin1")]
    assert blocks and ffns
    assert all((b.c_fc.attribute, b.c_fc.algorithm, type(b.act)) == ("gelu", "tanh", nn.Identity) for b in blocks)
    assert all((f.lin1.attribute, f.lin1.algorithm, type(f.activation)) == ("gelu", "none", nn.Identity) for f in ffns)


@pytest.mark.parametrize("activation", [NewGELUActivation(), GELUActivation()])
def test_a_fused_gelu_rounds_within_a_few_units_of_the_last_place_of_transformers_own(activation):
    torch.manual_seed(0)
    parent = nn.Module()
    parent.c_fc, parent.act = OneDnnLinear(nn.Linear(768, 3072)), activation
    x = torch.randn(8, 768)
    with torch.inference_mode():
        expected = activation(parent.c_fc(x))
        fuse_gelu(parent)
        got = parent.c_fc(x)
    assert isinstance(parent.act, nn.Identity)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)

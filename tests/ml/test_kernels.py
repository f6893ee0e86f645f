import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from transformers import AutoModelForCausalLM
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

from server.ml import kernels, matvec
from server.ml.decoding import GenerationParams
from server.ml.device import CPU_FLOAT32, Placement
from server.ml.generator import TextGenerator
from server.ml.kernels import KernelChoice, choose, linear_shapes, measured_choice
from server.ml.loader import locate
from server.ml.matvec import Int8MatVecLinear, MatVecLinear
from server.ml.precision import (
    OneDnnLinear,
    OneRowApart,
    fuse_gelu,
    int8_engines_available,
    linear_onednn,
    quantize_linear_int8,
)
from tests.ml.conftest import LONG, MIDDLE, SHORT

PROMPTS = ["Once upon a time", "The weather today is", "A", LONG, MIDDLE, SHORT]


def timing(torch_s: float, onednn_s: float) -> dict[str, float]:
    return {"torch": torch_s, "onednn": onednn_s}


def test_onednn_gets_a_shape_where_it_costs_the_model_less_over_every_row_count():
    # On torch the model takes 10 s for one row and 100 s for a batch: each row count weighs the same.
    timings = {
        (768, 2304): {1: timing(4.0, 2.0), 32: timing(40.0, 20.0)},  # faster at both
        (768, 768): {1: timing(1.0, 1.1), 32: timing(20.0, 10.0)},  # 1% slower alone, 10% faster batched
        (3072, 768): {1: timing(4.0, 2.0), 32: timing(35.0, 70.0)},  # 20% faster alone, 35% slower batched
        (768, 3072): {1: timing(1.0, 1.0), 32: timing(5.0, 5.0)},  # a tie goes to torch, the reference
    }
    one_each = dict.fromkeys(timings, 1)
    assert choose(timings, one_each) == {(768, 2304), (768, 768)}
    # The same timings, the same choice.
    assert choose(dict(reversed(timings.items())), one_each) == choose(timings, one_each)
    assert choose({}, {}) == frozenset()


def test_a_shape_weighs_by_how_many_layers_have_it():
    # 1% slower at 8 rows and 2% faster at 32 is a gain for a shape the model's time is all about, not for a rare one.
    timings = {
        (8, 8): {8: timing(1.0, 1.01), 32: timing(1.0, 0.98)},
        (8, 99): {8: timing(1.0, 1.0), 32: timing(10.0, 10.0)},
    }
    assert choose(timings, {(8, 8): 12, (8, 99): 1}) == {(8, 8)}
    assert choose(timings, {(8, 8): 1, (8, 99): 1}) == frozenset()


def test_in_int8_the_reference_is_fbgemm():
    timings = {
        (8, 8): {1: {"fbgemm": 1.0, "onednn": 0.5}, 32: {"fbgemm": 4.0, "onednn": 2.0}},
        (8, 32): {1: {"fbgemm": 1.0, "onednn": 1.0}, 32: {"fbgemm": 4.0, "onednn": 4.0}},  # a tie: fbgemm
        (32, 8): {1: {"fbgemm": 1.0, "onednn": 3.0}, 32: {"fbgemm": 4.0, "onednn": 5.0}},
    }
    assert choose(timings, dict.fromkeys(timings, 1), "fbgemm") == {(8, 8)}
    with pytest.raises(KeyError):  # fp32 timings name torch, never fbgemm
        choose(timings, dict.fromkeys(timings, 1))


@pytest.mark.parametrize(
    ("onednn", "reference", "summary"),
    [
        ({(1, 2), (3, 4)}, "torch", "onednn"),
        ({(1, 2)}, "torch", "mixed"),
        (set(), "torch", "torch"),
        (set(), "fbgemm", "fbgemm"),
        ({(3, 4)}, "fbgemm", "mixed"),
    ],
)
def test_a_choice_is_summed_up_as_onednn_the_reference_or_mixed(onednn, reference, summary):
    assert KernelChoice(frozenset(onednn), frozenset({(1, 2), (3, 4)}), "", reference).summary == summary


def generator(
    standins,
    kernels: str = "torch",
    precision: str = "fp32",
    cache: Path | None = None,
    placement: Placement = CPU_FLOAT32,
) -> TextGenerator:
    """The stand-in; with `cache`, its kernel timings kept there, so injected ones neither meet nor leave others."""
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    return TextGenerator.load(location, str(cache or standins[0].parent), precision, kernels, placement)


def test_the_shapes_are_those_of_every_linear_and_conv1d(standins):
    model = generator(standins).model
    shapes = linear_shapes(model)
    expected = {(m.nx, m.nf) for m in model.modules() if isinstance(m, Conv1D)}
    expected |= {(m.in_features, m.out_features) for m in model.modules() if type(m) is nn.Linear}
    assert list(shapes) == sorted(expected) and len(shapes) >= 4
    assert sum(shapes.values()) == sum(type(m) is nn.Linear or isinstance(m, Conv1D) for m in model.modules())


def test_each_timed_call_runs_on_the_next_copy_after_one_uncounted_call_on_each():
    calls = []
    runs = [lambda x, i=i: calls.append(i) for i in range(3)]
    assert kernels.seconds(runs, torch.zeros(1)) >= 0
    assert calls == [0, 1, 2] + [i % 3 for i in range(kernels.REPEATS)]


@pytest.mark.parametrize(
    ("cache_bytes", "copies"),
    [
        (1 << 20, {(64, 64): 18, (64, 256): 5}),  # the whole model (288 KiB) fits: as many as a step reads
        (64 << 10, {(64, 64): 8, (64, 256): 2}),  # twice the cache (128 KiB) and no more
    ],
)
def test_a_weight_is_timed_on_as_many_copies_as_a_step_reads_between_two_reads_of_it(monkeypatch, cache_bytes, copies):
    monkeypatch.setattr(kernels, "largest_cache_bytes", lambda: cache_bytes)
    layers = {(64, 64): 10, (64, 256): 2}
    assert {shape: kernels.streamed_copies(shape, layers, 4) for shape in layers} == copies
    built: dict[tuple[int, int], list[torch.Tensor]] = {}
    real = kernels.candidates

    def candidates(linear, precision, one_row):
        built.setdefault((linear.in_features, linear.out_features), []).append(linear.weight.detach().clone())
        return real(linear, precision, one_row)

    monkeypatch.setattr(kernels, "candidates", candidates)
    timings = kernels.measure(layers, (1, 4))
    assert {shape: len(weights) for shape, weights in built.items()} == copies
    # Distinct weights: no copy is read from the cache another left it in.
    assert all(not torch.equal(weights[0], weights[1]) for weights in built.values())
    assert set(timings) == set(layers) and all(set(timings[shape]) == {1, 4} for shape in layers)
    assert kernels.streamed_copies((8, 8), {(8, 8): 10_000}, 4) == kernels.MOST_COPIES


def test_timings_are_measured_once_per_machine_and_read_back(standins, tmp_path, monkeypatch):
    model = generator(standins).model
    first = measured_choice(model, (1, 4), tmp_path)
    [cached] = (tmp_path / "kernels").glob("*.json")
    stored = json.loads(cached.read_text())
    assert stored["key"]["rows"] == [1, 4] and stored["key"]["cpu"] == kernels.cpu_identity()["cpu"]
    assert stored["key"]["timed"] == kernels.TIMED
    # Our matrix-vector kernel computes one row only, so it is timed there only.
    assert all(set(entry["rows"]["1"]) == {"torch", "onednn", "matvec"} for entry in stored["timings"])
    assert all(set(entry["rows"]["4"]) == {"torch", "onednn"} for entry in stored["timings"])
    assert "measured in" in first.reason and "over 1 and 4 rows" in first.reason

    def no_measuring(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(kernels, "measure", no_measuring)
    again = measured_choice(model, (1, 4), tmp_path)
    assert again.onednn == first.onednn and "cached" in again.reason


def test_a_changed_one_row_kernel_is_timed_again(standins, tmp_path, monkeypatch):
    model = generator(standins).model
    measured_choice(model, (1, 4), tmp_path)
    monkeypatch.setattr(matvec, "source_digest", lambda: "another source")
    assert "measured in" in measured_choice(model, (1, 4), tmp_path).reason
    assert len(list((tmp_path / "kernels").glob("*.json"))) == 2
    # A model never timed at one row does not depend on it.
    measured_choice(model, (4,), tmp_path)
    monkeypatch.setattr(matvec, "source_digest", lambda: "a third source")
    assert "cached" in measured_choice(model, (4,), tmp_path).reason


def test_cached_timings_decide_the_choice_and_a_broken_file_is_measured_again(standins, tmp_path, monkeypatch):
    model = generator(standins).model
    measured_choice(model, (1, 4), tmp_path)
    [cached] = (tmp_path / "kernels").glob("*.json")
    stored = json.loads(cached.read_text())
    for entry in stored["timings"]:  # oneDNN made to win everywhere: the choice follows the file
        entry["rows"] = {rows: timing(2.0, 1.0) for rows in entry["rows"]}
    cached.write_text(json.dumps(stored))
    assert measured_choice(model, (1, 4), tmp_path).summary == "onednn"

    cached.write_text("{not json")
    fake = {shape: {1: timing(1.0, 2.0), 4: timing(1.0, 2.0)} for shape in linear_shapes(model)}
    monkeypatch.setattr(kernels, "measure", lambda shapes, rows, precision, dtype: fake)
    assert measured_choice(model, (1, 4), tmp_path).summary == "torch"
    assert json.loads(cached.read_text())["timings"]  # rewritten


def test_any_mix_of_kernels_gives_transformers_greedy_output(standins):
    reference = generator(standins)
    params = GenerationParams(max_new_tokens=12)
    prompts = [reference.encode(p) for p in PROMPTS]
    expected = [reference.generate([p], params)[0] for p in prompts]
    shapes = list(linear_shapes(reference.model))
    for onednn in (shapes[::2], shapes[1::2]):
        mixed = generator(standins)
        linear_onednn(mixed.model, onednn)
        packed = {(m.in_features, m.out_features) for m in mixed.model.modules() if isinstance(m, OneDnnLinear)}
        assert packed == set(onednn)
        assert mixed.generate(prompts, params) == expected
        assert [mixed.generate([p], params)[0] for p in prompts] == expected


def test_auto_kernels_are_measured_at_load_and_say_why(standins, monkeypatch, tmp_path):
    fake = {}

    def measure(shapes, rows, precision, dtype):
        shapes = list(shapes)
        fake.update({shape: {n: timing(1.0, 0.5 if shape == shapes[0] else 2.0) for n in rows} for shape in shapes})
        return fake

    monkeypatch.setattr(kernels, "measure", measure)
    loaded = generator(standins, "auto", cache=tmp_path)
    assert loaded.kernels == "mixed" and "1 of" in loaded.kernels_reason and "rows" in loaded.kernels_reason
    assert rows_seen(fake) == set(TextGenerator.kernel_rows)
    packed = [m for m in loaded.model.modules() if isinstance(m, OneDnnLinear)]
    assert {(m.in_features, m.out_features) for m in packed} == {min(fake)}


def rows_seen(timings) -> set[int]:
    return {rows for by_rows in timings.values() for rows in by_rows}


needs_both_engines = pytest.mark.skipif(not int8_engines_available(), reason="this torch build lacks fbgemm or oneDNN")


@needs_both_engines
def test_int8_layers_are_packed_for_the_engine_their_shape_was_given(standins):
    # fbgemm and oneDNN quantize alike but sum in another order: each layer's output says which engine packed it.
    fp32 = AutoModelForCausalLM.from_pretrained(standins[0]).eval()
    shapes = list(linear_shapes(fp32))
    every = {
        engine: quantize_linear_int8(copy.deepcopy(fp32), onednn=onednn)
        for engine, onednn in (("fbgemm", ()), ("onednn", shapes))
    }
    mixed = quantize_linear_int8(copy.deepcopy(fp32), onednn=shapes[::2])
    by_engine = {engine: dict(model.named_modules()) for engine, model in every.items()}
    layers = [(name, m) for name, m in mixed.named_modules() if isinstance(m, DynamicQuantizedLinear)]
    assert len(layers) == sum(linear_shapes(fp32).values())
    told_apart = 0
    for name, layer in layers:
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
        expected = "onednn" if (layer.in_features, layer.out_features) in shapes[::2] else "fbgemm"
        with torch.inference_mode():
            outputs = {engine: modules[name](x) for engine, modules in by_engine.items()}
            assert torch.equal(layer(x), outputs[expected])
        told_apart += not torch.equal(outputs["fbgemm"], outputs["onednn"])
    if not told_apart:  # the check above then cannot tell the engines apart
        pytest.skip("fbgemm and oneDNN give bit-identical outputs on this CPU")


@needs_both_engines
def test_an_int8_shape_kept_apart_for_one_row_runs_one_row_on_fbgemm_and_more_on_onednn(standins):
    fp32 = AutoModelForCausalLM.from_pretrained(standins[0]).eval()
    shapes = list(linear_shapes(fp32))
    every = {
        engine: dict(quantize_linear_int8(copy.deepcopy(fp32), onednn=onednn).named_modules())
        for engine, onednn in (("fbgemm", ()), ("onednn", shapes))
    }
    apart = quantize_linear_int8(copy.deepcopy(fp32), onednn=shapes, lone_on_fbgemm=shapes[:1])
    layers = [(name, m) for name, m in apart.named_modules() if isinstance(m, OneRowApart)]
    assert len(layers) == linear_shapes(fp32)[shapes[0]]
    told_apart = 0
    for name, layer in layers:
        one, many = (
            torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(1)) for rows in (1, 3)
        )
        with torch.inference_mode():
            assert torch.equal(layer(one), every["fbgemm"][name](one))
            assert torch.equal(layer(many), every["onednn"][name](many))
            told_apart += not torch.equal(every["fbgemm"][name](one), every["onednn"][name](one))
    if not told_apart:
        pytest.skip("fbgemm and oneDNN give bit-identical outputs on this CPU")


def test_int8_one_row_stays_on_fbgemm_where_it_was_faster_there():
    timings = {
        (8, 8): {1: {"fbgemm": 1.0, "onednn": 1.2}, 32: {"fbgemm": 4.0, "onednn": 2.0}},
        (8, 32): {1: {"fbgemm": 1.0, "onednn": 0.5}, 32: {"fbgemm": 4.0, "onednn": 2.0}},
    }
    onednn = choose(timings, dict.fromkeys(timings, 1), "fbgemm")
    assert onednn == {(8, 8), (8, 32)}
    assert kernels.one_row_reference(timings, onednn, "fbgemm") == {(8, 8)}


@needs_both_engines
def test_int8_engines_are_measured_at_load_cached_apart_from_fp32_and_say_why(standins, tmp_path, monkeypatch):
    model = generator(standins).model
    measured_choice(model, (1, 4), tmp_path)
    int8 = measured_choice(model, (1, 4), tmp_path, "int8")
    assert len(list((tmp_path / "kernels").glob("*.json"))) == 2
    assert "int8: oneDNN where it beat fbgemm's int8 GEMM over 1 and 4 rows" in int8.reason
    assert int8.summary in ("onednn", "fbgemm", "mixed")

    seen = []

    def measure(shapes, rows, precision, dtype):
        seen.append(precision)
        shapes = list(shapes)
        return {s: {n: {"fbgemm": 1.0, "onednn": 0.5 if s == shapes[-1] else 2.0} for n in rows} for s in shapes}

    monkeypatch.setattr(kernels, "measure", measure)
    loaded = generator(standins, precision="int8", cache=tmp_path / "injected")
    assert seen == ["int8"] and loaded.kernels == "mixed" and "1 of" in loaded.kernels_reason
    quantized = [m for m in loaded.model.modules() if isinstance(m, DynamicQuantizedLinear)]
    assert len(quantized) == sum(linear_shapes(model).values())


needs_int8_units = pytest.mark.skipif(not matvec.has("int8"), reason="our int8 kernel needs AVX512-VNNI")


def int8_setting(standins):
    """What the int8 greedy-output tests share: their parameters, the stand-in in fp32 to quantize (copies of it),
    its Linear shapes, its tokenizer and the test prompts encoded."""
    params = GenerationParams(max_new_tokens=12)
    fp32 = AutoModelForCausalLM.from_pretrained(standins[0]).eval()
    shapes = list(linear_shapes(fp32))
    tokenizer = generator(standins).tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    return params, fp32, shapes, tokenizer, prompts


@needs_both_engines
@needs_int8_units
def test_int8_one_row_on_our_kernel_gives_fbgemms_greedy_output(standins):
    params, fp32, shapes, tokenizer, prompts = int8_setting(standins)
    fbgemm = TextGenerator(quantize_linear_int8(copy.deepcopy(fp32), onednn=()), tokenizer, "s", "r", True, "int8")
    # fbgemm's shapes and oneDNN's alike send one row to the kernel.
    ours = quantize_linear_int8(copy.deepcopy(fp32), onednn=shapes[::2], lone_on_matvec=shapes)
    apart = [m for m in ours.modules() if isinstance(m, OneRowApart)]
    assert len(apart) == sum(linear_shapes(fp32).values())
    assert all(isinstance(m.one_row, Int8MatVecLinear) and isinstance(m.rows, DynamicQuantizedLinear) for m in apart)
    model = TextGenerator(ours, tokenizer, "s", "r", True, "int8")
    expected = [fbgemm.generate([p], params)[0] for p in prompts]
    assert [model.generate([p], params)[0] for p in prompts] == expected
    assert [model.complete([p], params)[0] for p in prompts] == expected
    assert model.generate(prompts, params) == fbgemm.generate(prompts, params)


@needs_both_engines
@needs_int8_units
def test_int8_one_row_goes_to_our_kernel_where_it_was_timed_fastest(standins, monkeypatch, tmp_path):
    alone = {"fbgemm": 2.0, "onednn": 3.0, "matvec": 1.0}
    monkeypatch.setattr(
        kernels,
        "measure",
        lambda shapes, rows, precision, dtype: {s: {1: alone, 32: {"fbgemm": 1.0, "onednn": 2.0}} for s in shapes},
    )
    loaded = generator(standins, precision="int8", cache=tmp_path)
    one_row = [m for m in loaded.model.modules() if isinstance(m, Int8MatVecLinear)]
    assert len(one_row) == sum(linear_shapes(generator(standins).model).values())
    assert loaded.kernels == "fbgemm" and "on our matrix-vector kernel for one row" in loaded.kernels_reason


@needs_both_engines
def test_any_mix_of_int8_engines_gives_the_same_greedy_output(standins):
    params, fp32, shapes, tokenizer, prompts = int8_setting(standins)
    outputs = []
    for onednn in ((), shapes[::2], shapes[1::2], shapes):
        int8 = quantize_linear_int8(copy.deepcopy(fp32), onednn=onednn)
        model = TextGenerator(int8, tokenizer, "stand-in", "r", True, "int8")
        outputs.append((model.generate(prompts, params), [model.generate([p], params)[0] for p in prompts]))
    assert all(output == outputs[0] for output in outputs)


def test_one_row_runs_on_torch_for_the_onednn_shapes_torch_computes_faster_alone():
    timings = {
        (8, 8): {1: timing(1.0, 2.0), 32: timing(20.0, 10.0)},  # slower alone, faster batched
        (8, 32): {1: timing(1.0, 0.5), 32: timing(20.0, 10.0)},  # faster at both
        (32, 8): {1: timing(1.0, 1.5), 32: timing(10.0, 20.0)},  # torch's anyway
    }
    # (8, 8) would lose more alone on oneDNN than it gains batched; with its one-row calls on torch it gains.
    onednn = choose(timings, dict.fromkeys(timings, 1))
    assert onednn == {(8, 8), (8, 32)}
    assert kernels.one_row_reference(timings, onednn) == {(8, 8)}
    assert kernels.one_row_reference({(8, 8): {32: timing(1.0, 2.0)}}, frozenset({(8, 8)})) == frozenset()


def test_one_row_goes_to_our_matvec_kernel_where_it_was_the_fastest_there():
    def one_row(torch_s: float, onednn_s: float, matvec_s: float) -> dict[str, float]:
        return {**timing(torch_s, onednn_s), "matvec": matvec_s}

    timings = {
        (8, 8): {1: one_row(2.0, 1.5, 1.0), 32: timing(20.0, 10.0)},  # matvec fastest alone
        (8, 32): {1: one_row(1.0, 1.5, 1.2), 32: timing(20.0, 10.0)},  # torch fastest alone
        (32, 8): {1: one_row(2.0, 1.0, 1.0), 32: timing(20.0, 10.0)},  # a tie stays on oneDNN
        (32, 32): {1: one_row(0.9, 3.0, 0.5), 32: timing(10.0, 20.0)},  # oneDNN loses overall even so
    }
    onednn = choose(timings, dict.fromkeys(timings, 1))
    assert onednn == {(8, 8), (8, 32), (32, 8)}
    # (32, 32) stays on torch, which holds no oneDNN packing: its one row goes to the kernel all the same.
    assert kernels.one_row_matvec(timings, onednn) == {(8, 8), (32, 32)}
    assert kernels.one_row_reference(timings, onednn) == {(8, 32)}
    # Against the reference alone for a shape left on it: oneDNN's faster one row is not there to take.
    kept = {(8, 8): {1: one_row(1.0, 0.2, 0.8), 32: timing(1.0, 5.0)}}
    assert choose(kept, {(8, 8): 1}) == frozenset() and kernels.one_row_matvec(kept, frozenset()) == {(8, 8)}
    # Counted at its one-row time, oneDNN wins a shape it would lose on its own time alone.
    closer = {
        (8, 8): {1: one_row(1.0, 4.0, 0.5), 32: timing(2.0, 1.8)},
        (8, 32): {1: timing(1.0, 1.0), 32: timing(2.0, 2.0)},
    }
    assert choose(closer, dict.fromkeys(closer, 1)) == {(8, 8)}


def test_a_shape_left_on_torch_sends_one_row_to_our_kernel_beside_oneDNNs_shapes():
    model = linear_onednn(
        nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 32)), shapes={(16, 32)}, lone_on_matvec={(16, 16), (16, 32)}
    )
    assert [(type(m.rows), type(m.one_row)) for m in model] == [
        (nn.Linear, MatVecLinear),
        (OneDnnLinear, MatVecLinear),
    ]
    one, many = torch.randn(1, 16), torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(model[0](one), model[0].one_row(one)) and torch.equal(model[0](many), model[0].rows(many))


class FeedForward(nn.Module):
    def __init__(self, c_fc: nn.Module, act: nn.Module):
        super().__init__()
        self.c_fc, self.act = c_fc, act


@pytest.mark.parametrize("act", [None, NewGELUActivation(), nn.GELU()], ids=["no GELU", "tanh GELU", "erf GELU"])
def test_a_layer_kept_plain_beside_its_packed_weight_computes_one_row_on_torch_with_or_without_its_gelu(act):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    packed = OneDnnLinear(linear)
    apart = OneRowApart(packed, linear, 64)
    activation = act or nn.Identity()
    if act is not None:
        block = fuse_gelu(FeedForward(apart, GELUActivation() if isinstance(act, nn.GELU) else act))
        assert isinstance(block.act, nn.Identity)
        apart = block.c_fc
        packed = OneDnnLinear(packed, gelu="tanh" if isinstance(act, NewGELUActivation) else "none")
    one, many = torch.randn(1, 1, 64), torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.equal(apart(one), activation(linear(one)))
        assert torch.equal(apart(many), packed(many))
        assert not torch.equal(packed(one), apart(one))  # oneDNN sums in another order: the two paths differ


def test_after_our_kernel_a_tanh_gelu_runs_in_torchs_one_pass_form():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    for act, after in ((NewGELUActivation(), GELUTanh), (GELUActivation(), GELUActivation)):
        block = fuse_gelu(FeedForward(OneRowApart(OneDnnLinear(linear), MatVecLinear(linear), 64), act))
        kernel, gelu = block.c_fc.one_row
        assert isinstance(kernel, MatVecLinear) and type(gelu) is after
        one = torch.randn(1, 1, 64)
        with torch.inference_mode():
            assert torch.equal(block.c_fc(one), gelu(kernel(one)))
            assert torch.allclose(block.c_fc(one), act(linear(one)), rtol=0, atol=1e-5)


def test_a_model_never_timed_at_one_row_is_neither_built_for_nor_wrapped_in_our_kernel(monkeypatch, tmp_path):
    def unwanted(form) -> bool:
        raise AssertionError("our one-row kernel asked for by a model timed at batches only")

    monkeypatch.setattr(matvec, "has", unwanted)
    choice = measured_choice(nn.Sequential(nn.Linear(16, 16)), (4, 8), tmp_path)
    assert not choice.lone_on_matvec and "matrix-vector" not in choice.reason
    [cached] = (tmp_path / "kernels").glob("*.json")
    assert json.loads(cached.read_text())["key"]["kernels"] == ["torch", "onednn"]


def test_a_measured_choice_puts_one_row_on_our_matvec_kernel_and_keeps_transformers_greedy_output(
    standins, monkeypatch, tmp_path
):
    reference = generator(standins)
    params = GenerationParams(max_new_tokens=12)
    prompts = [reference.encode(p) for p in PROMPTS]
    expected = [reference.generate([p], params)[0] for p in prompts]
    alone = {**timing(2, 2), "matvec": 1}
    monkeypatch.setattr(
        kernels,
        "measure",
        lambda shapes, rows, precision, dtype: {s: {1: alone, 32: timing(2, 1)} for s in shapes},
    )
    loaded = generator(standins, "auto", cache=tmp_path)
    apart = [m for m in loaded.model.modules() if isinstance(m, OneRowApart)]
    one_row = [m for m in loaded.model.modules() if isinstance(m, MatVecLinear)]
    assert apart and len(one_row) == len(apart) == sum(linear_shapes(reference.model).values())
    assert loaded.kernels == "onednn" and "on our matrix-vector kernel for one row" in loaded.kernels_reason
    assert loaded.generate(prompts, params) == expected
    # One prompt at a time: every product of every step is one row, on the kernel.
    assert [loaded.generate([p], params)[0] for p in prompts] == expected
    assert [loaded.complete([p], params)[0] for p in prompts] == expected


@pytest.mark.skipif(not matvec.has("bfloat16"), reason="our bfloat16 kernel needs AVX512-BF16")
def test_in_bfloat16_a_measured_choice_puts_one_row_on_our_kernel_and_keeps_torchs_greedy_output(
    standins, monkeypatch, tmp_path
):
    bf16 = Placement(torch.device("cpu"), torch.bfloat16)
    reference = generator(standins, placement=bf16)
    params = GenerationParams(max_new_tokens=12)
    prompts = [reference.encode(p) for p in PROMPTS]
    expected = [reference.generate([p], params)[0] for p in prompts]
    seen = []

    def measure(shapes, rows, precision, dtype):
        seen.append(dtype)
        return {s: {1: {"torch": 2, "onednn": 3, "matvec": 1}, 32: timing(1, 2)} for s in shapes}

    monkeypatch.setattr(kernels, "measure", measure)
    loaded = generator(standins, "auto", cache=tmp_path, placement=bf16)
    one_row = [m for m in loaded.model.modules() if isinstance(m, MatVecLinear)]
    assert seen == [torch.bfloat16] and all(m.weight.dtype == torch.bfloat16 for m in one_row)
    assert len(one_row) == sum(linear_shapes(reference.model).values())
    assert loaded.kernels == "torch" and "5 on our matrix-vector kernel for one row" in loaded.kernels_reason
    assert [loaded.generate([p], params)[0] for p in prompts] == expected
    assert [loaded.complete([p], params)[0] for p in prompts] == expected


def test_a_measured_choice_keeps_one_row_on_torch_where_it_was_faster(standins, monkeypatch, tmp_path):
    reference = generator(standins)
    params = GenerationParams(max_new_tokens=12)
    prompts = [reference.encode(p) for p in PROMPTS]
    expected = [reference.generate([p], params)[0] for p in prompts]
    monkeypatch.setattr(
        kernels,
        "measure",
        lambda shapes, rows, precision, dtype: {s: {1: timing(1, 2), 32: timing(2, 1)} for s in shapes},
    )
    loaded = generator(standins, "auto", cache=tmp_path)
    apart = [m for m in loaded.model.modules() if isinstance(m, OneRowApart)]
    packed = [m for m in loaded.model.modules() if isinstance(m, OneDnnLinear)]
    assert apart and len(apart) == len(packed) and all(isinstance(m.rows, OneDnnLinear) for m in apart)
    assert loaded.kernels == "onednn" and "of them on torch's GEMM for one row" in loaded.kernels_reason
    assert loaded.generate(prompts, params) == expected
    assert [loaded.generate([p], params)[0] for p in prompts] == expected

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils import cpp_extension
from transformers.pytorch_utils import Conv1D

from server.ml import kernels, matvec
from server.ml.matvec import Int8MatVecLinear, MatVecLinear
from server.ml.precision import Int8Linear, linear_from_conv1d, quantize_linear_int8


def rounding_bound(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """How far two float32 sums of the same products may lie apart, per output (twice one sum's error bound)."""
    width = weight.shape[1]
    magnitude = weight.double().abs() @ x.double().abs().reshape(-1)
    if bias is not None:
        magnitude += bias.double().abs()
    return 2 * (width + 1) * 2.0**-24 * magnitude + 1e-12


# Widths and heights off the kernel's 16 lanes and 8 rows, and GPT-2's own shapes.
SHAPES = [(5, 7), (17, 33), (16, 8), (64, 200), (768, 2304), (3072, 768)]


def linear_holding(weight: torch.Tensor, biased: bool) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=biased)
    linear.weight = nn.Parameter(weight)
    return linear


@pytest.mark.parametrize(("width", "height"), SHAPES)
@pytest.mark.parametrize("biased", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("layout", ["in place", "blocked"])
def test_one_row_is_torchs_product_to_float_rounding_at_any_shape(width, height, biased, layout):
    generator = torch.Generator().manual_seed(width * height)
    # A contiguous weight is read in place; a transposed view (GPT-2's projections) is copied blocked.
    weight = torch.randn(height, width, generator=generator)
    if layout == "blocked":
        weight = weight.t().contiguous().t()
    linear = linear_holding(weight, biased)
    kernel = MatVecLinear(linear)
    assert kernel.weight.dim() == (2 if layout == "in place" else 4)
    for x in (torch.randn(1, width, generator=generator), torch.randn(1, 1, width, generator=generator)):
        with torch.inference_mode():
            got, expected = kernel(x), linear(x)
        assert got.shape == expected.shape
        bound = rounding_bound(linear.weight.detach(), x, linear.bias)
        assert ((got - expected).double().abs().reshape(-1) <= bound).all()


def test_the_blocked_layout_interleaves_eight_rows_zero_padded_to_whole_blocks():
    weight = torch.arange(9 * 17, dtype=torch.float32).reshape(9, 17) + 1
    layout = matvec.blocked(weight, matvec.PIECES["float32"])
    assert layout.shape == (2, 2, 8, 16)
    assert torch.equal(layout[0, 0, 3], weight[3, :16]) and torch.equal(layout[0, 1, 3, :1], weight[3, 16:])
    assert torch.equal(layout[1, 1, 0, :1], weight[8, 16:])
    assert layout[0, 1, :, 1:].eq(0).all() and layout[1, :, 1:].eq(0).all()  # the padding adds nothing


def test_the_kernel_refuses_what_it_does_not_compute():
    built, _ = matvec.build()
    assert built is not None
    kernel = built.matvec
    weight = torch.randn(8, 4)
    layout = matvec.blocked(weight, matvec.PIECES["float32"])
    for x, w, out, message in (
        (torch.randn(2, 4), weight, 8, "one row of the weight's width and type"),
        (torch.randn(1, 5), weight, 8, "one row of the weight's width"),
        (torch.randn(1, 4).double(), weight, 8, "one row of the weight's width and type"),
        (torch.randn(1, 8), weight.t(), 4, "contiguous matrix"),
        (torch.randn(1, 4), weight.double(), 8, "must be float32"),
        (torch.randn(1, 4), weight, 7, "contiguous matrix of `out` rows"),
        (torch.randn(1, 4), layout, 9, "contiguous matrix of `out` rows"),
        (torch.randn(1, 17), layout, 8, "one row of the weight's width"),
    ):
        with pytest.raises(RuntimeError, match=message):
            kernel(x, w, None, out)


def test_gpt2s_transposed_projection_gets_a_blocked_copy_of_its_weight():
    conv = Conv1D(24, 16)  # nf, nx: a [16, 24] weight, transposed against a Linear's
    holder = linear_from_conv1d(nn.Sequential(conv))
    linear = holder[0]
    assert not linear.weight.is_contiguous()
    kernel = MatVecLinear(linear)
    assert torch.equal(kernel.weight, matvec.blocked(linear.weight.detach(), matvec.PIECES["float32"]))
    x = torch.randn(1, 16)
    with torch.inference_mode():
        bound = rounding_bound(linear.weight.detach(), x, conv.bias)
        assert ((kernel(x) - conv(x)).double().abs().reshape(-1) <= bound).all()


def test_the_lm_heads_contiguous_weight_is_shared_not_copied():
    linear = nn.Linear(32, 64, bias=False)
    assert MatVecLinear(linear).weight.data_ptr() == linear.weight.data_ptr()


def test_the_kernel_takes_float32_and_bfloat16_layers_only():
    with pytest.raises(TypeError, match="float32 or bfloat16, not torch.float16"):
        MatVecLinear(nn.Linear(16, 16).half())


needs_bf16_units = pytest.mark.skipif(not matvec.has("bfloat16"), reason="our bfloat16 kernel needs AVX512-BF16")


@needs_bf16_units
@pytest.mark.parametrize(("width", "height"), SHAPES)
@pytest.mark.parametrize("biased", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("layout", ["in place", "blocked"])
def test_in_bfloat16_one_row_is_its_exact_products_summed_in_float32_then_rounded_once(width, height, biased, layout):
    generator = torch.Generator().manual_seed(width * height)
    weight = torch.randn(height, width, generator=generator).bfloat16()
    if layout == "blocked":
        weight = weight.t().contiguous().t()
    linear = linear_holding(weight, biased).bfloat16()
    kernel = MatVecLinear(linear)
    assert kernel.weight.dim() == (2 if layout == "in place" else 4) and kernel.weight.dtype == torch.bfloat16
    for x in (torch.randn(1, width, generator=generator), torch.randn(1, 1, width, generator=generator)):
        x = x.bfloat16()
        with torch.inference_mode():
            got = kernel(x)
        assert got.dtype == torch.bfloat16 and got.shape == (*x.shape[:-1], height)
        bias = None if linear.bias is None else linear.bias.detach()
        exact = weight.double() @ x.double().reshape(-1) + (0 if bias is None else bias.double())
        # bfloat16 products are exact in float32: only the float32 sums round, then the one rounding to bfloat16
        # (8 significant bits).
        summed = rounding_bound(weight.float(), x.float(), None if bias is None else bias.float())
        assert ((got.double().reshape(-1) - exact).abs() <= summed + 2.0**-8 * (exact.abs() + summed)).all()


@needs_bf16_units
def test_a_bfloat16_projection_is_blocked_in_32_value_pieces():
    linear = linear_from_conv1d(nn.Sequential(Conv1D(24, 40).bfloat16()))[0]
    kernel = MatVecLinear(linear)
    assert kernel.weight.shape == (3, 2, 8, 32)
    assert torch.equal(kernel.weight, matvec.blocked(linear.weight.detach(), matvec.PIECES["bfloat16"]))


@pytest.mark.skipif(matvec.has("bfloat16"), reason="this CPU has AVX512-BF16")
def test_without_bf16_units_the_bfloat16_kernel_is_refused_and_says_why():
    with pytest.raises(RuntimeError, match="has no bfloat16 form on this CPU \\(no AVX512-BF16\\)"):
        MatVecLinear(nn.Linear(16, 16).bfloat16())


needs_int8_units = pytest.mark.skipif(not matvec.has("int8"), reason="our int8 kernel needs AVX512-VNNI")


def quantized(width: int, height: int, biased: bool, generator: torch.Generator) -> Int8Linear:
    linear = nn.Linear(width, height, bias=biased)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(height, width, generator=generator))
    return quantize_linear_int8(nn.Sequential(linear), onednn=()).get_submodule("0")


# Inputs of every sign mix (the zero point at either end or inside), all zero (the grid's fallback scale) and tiny
# (its smallest scale).
INPUTS = {
    "mixed": lambda g, n: torch.randn(1, n, generator=g),
    "positive": lambda g, n: torch.rand(1, n, generator=g) + 0.5,
    "negative": lambda g, n: -torch.rand(1, n, generator=g),
    "zero": lambda g, n: torch.zeros(1, n),
    "tiny": lambda g, n: torch.randn(1, n, generator=g) * 1e-6,
}


@needs_int8_units
@pytest.mark.parametrize(("width", "height"), SHAPES)
@pytest.mark.parametrize("biased", [True, False], ids=["bias", "no bias"])
def test_the_int8_kernel_is_fbgemms_product_to_float_rounding(width, height, biased):
    generator = torch.Generator().manual_seed(width + height)
    layer = quantized(width, height, biased, generator)
    kernel = Int8MatVecLinear(layer)
    for name, make in INPUTS.items():
        x = make(generator, width)
        with torch.inference_mode():
            got, expected = kernel(x), layer(x)
        # The same int32 sums: only the scaling's rounding differs (a few units in the last place of the larger of
        # the scaled sum and the bias, where the two cancel).
        bias = 0 if layer.bias() is None else layer.bias().abs()
        assert ((got - expected).abs() <= 4e-6 * (expected.abs() + bias) + 1e-30).all(), name


@needs_int8_units
def test_the_int8_kernel_refuses_what_it_does_not_compute():
    layer = quantized(24, 16, True, torch.Generator().manual_seed(0))
    kernel = Int8MatVecLinear(layer)
    with pytest.raises(RuntimeError, match="one float32 row"):
        kernel(torch.randn(2, 24))
    with pytest.raises(RuntimeError, match="blocked int8 matrix"):
        kernel.kernel(torch.randn(1, 24), kernel.weight, kernel.scales, kernel.sums, kernel.bias, 17)


def test_the_int8_kernel_takes_quantized_layers_only():
    with pytest.raises(TypeError, match="not Linear"):
        Int8MatVecLinear(nn.Linear(16, 16))


@pytest.mark.skipif(matvec.has("int8"), reason="this CPU has AVX512-VNNI")
def test_without_int8_units_the_int8_kernel_is_refused_and_says_why():
    with pytest.raises(RuntimeError, match="no AVX512-VNNI"):
        Int8MatVecLinear(quantized(16, 16, True, torch.Generator().manual_seed(0)))


def test_without_a_compiler_the_kernel_is_left_out_and_the_choice_says_why(monkeypatch, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'server_matvec': c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    matvec.build.cache_clear()
    try:
        assert matvec.build() == (None, "not built (Error building extension 'server_matvec': c++: command not found)")
        assert not matvec.has("float32")
        with pytest.raises(RuntimeError, match="not built"):
            MatVecLinear(nn.Linear(4, 4))
        assert set(kernels.candidates(nn.Linear(4, 4), "fp32", one_row=True)) == {"torch", "onednn"}
        choice = kernels.measured_choice(nn.Sequential(nn.Linear(16, 16)), (1, 4), tmp_path)
        assert "our matrix-vector kernel not built (" in choice.reason and not choice.lone_on_matvec
    finally:
        matvec.build.cache_clear()  # the next test builds again (torch's loader finds the earlier build)


def test_a_lock_left_by_a_build_killed_midway_does_not_stop_the_next(tmp_path):
    # torch's loader waits as long as its lock file exists; a process killed while building leaves it behind.
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    load = [sys.executable, "-c", "from server.ml import matvec; print(matvec.build()[1])"]
    assert subprocess.run(load, env=environment, capture_output=True, text=True, timeout=300).stdout.strip() == (
        "built for this CPU"
    )
    [directory] = [path for path in tmp_path.iterdir() if path.is_dir()]
    (directory / "lock").touch()
    again = subprocess.run(load, env=environment, capture_output=True, text=True, timeout=120)
    assert again.stdout.strip() == "built for this CPU" and not (directory / "lock").exists()

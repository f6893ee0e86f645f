"""The numeric precision a model computes in: `fp32` as trained, or `int8` (dynamic quantization of its Linear layers),
and for fp32 who computes the Linear layers: torch's default GEMM, or oneDNN (`linear_onednn`, the fast exact path).

`int8` stores every `nn.Linear` weight as int8 (one scale per output channel) and quantizes each layer's input on the
fly, so matrix products run as int8 GEMMs; embeddings, layer norms and attention stay fp32. It changes outputs (see
docs/precision.md): it is opt-in, and a quantized model answers under another name. Two of torch's quantized engines
compute these GEMMs: fbgemm (AVX2 and AVX-512) and oneDNN (which reaches the VNNI and AMX int8 units); both apply the
same quantization, so they differ only in the summation order, and server/ml/kernels.py times them per Linear shape.

GPT-2's projections are transformers' `Conv1D`, a Linear whose weight is stored transposed, which quantization does
not recognise: they are turned into `nn.Linear` first (on its own an exact change), so that every projection, not
only the LM head, is quantized. GPT-2 ties its LM head to the token embedding; the tie is dropped so that the head is
quantized while the embedding keeps its fp32 rows.

Why `torch.ao.quantization.quantize_dynamic`, which torch deprecates in favour of torchao: torchao's replacement
(`quantize_(model, Int8DynamicActivationInt8WeightConfig())`) relies on `torch.compile` for its speed on CPU; in eager
mode, as the server runs, it is slower than fp32 for one row (pytorch/ao#4365, pytorch/ao#3157). The deprecation
warnings are silenced at the one call, by message, and nowhere else.
"""

import copy
import logging
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import PreTrainedModel
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

from server.ml.matvec import Int8MatVecLinear, MatVecLinear

log = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# `auto`: measured per Linear shape on this CPU (server/ml/kernels.py); a model then reports `onednn`, `torch` or
# `mixed`.
Kernels = Literal["auto", "onednn", "torch"]
# fbgemm: torch's other int8 engine beside oneDNN, for the shapes where it measured faster.
ServedKernels = Literal["onednn", "torch", "fbgemm", "mixed"]
# The quantized engines timed for int8, the reference first.
INT8_ENGINES: tuple[ServedKernels, ServedKernels] = ("fbgemm", "onednn")


def usable_kernels(kernels: Kernels) -> Kernels:
    """`kernels`, or `torch` where this torch build has no oneDNN (with a warning if oneDNN was asked for): the
    default must not stop a server from starting, and `/` and `/health` then say which kernels run."""
    if kernels != "torch" and not torch.backends.mkldnn.is_available():
        if kernels == "auto":
            return "torch"
        log.warning(
            "this torch build has no oneDNN: fp32 Linear layers run on torch's default GEMM instead "
            "(set GENERATOR_FP32_KERNELS / SENTIMENT_FP32_KERNELS=torch to silence this)"
        )
        return "torch"
    return kernels


def apply_precision(model: nn.Module, precision: Precision, kernels: Literal["onednn", "torch"] = "torch") -> nn.Module:
    """The model computing in `precision`; fp32 with `kernels="onednn"` runs its Linear layers on oneDNN (`auto` is
    the loader's: it measures first); int8 on torch's default quantized engine (the loader measures which engine
    each shape gets). Either conversion changes `model` itself, in seconds: copy it first to keep the original."""
    if precision == "fp32":
        return linear_onednn(model) if kernels == "onednn" else model
    if precision != "int8":
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return quantize_linear_int8(model)


def linear_from_conv1d(model: nn.Module) -> nn.Module:
    """Replace each `Conv1D` by an `nn.Linear` computing exactly the same, in place.

    The Linear's weight is the transposed *view* of the Conv1D's: `F.linear` then multiplies by the same matrix in
    the same memory layout as Conv1D's `addmm`, so outputs are bit-identical, and no weight is copied.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.nx, child.nf, device="meta")
                linear.weight = nn.Parameter(child.weight.detach().t(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, child_name, linear)
    return model


def untie_output_embeddings(model: nn.Module) -> None:
    """Drop a tie between the output layer and the input embedding, so that quantizing one leaves the other.

    Replacing the output layer already separates them; the config says so too, so that a later `tie_weights()`
    (transformers calls it when it re-initialises or resizes) does not bind the fp32 embedding to a quantized module.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys") and isinstance(model, PreTrainedModel):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


# The row count oneDNN lays the packed weights out for. Measured on the bench model (GPT-2-124M, 2 cores), packed for
# 8, 32 and 64 rows: 32 was fastest both for a lone request and for a batch of 32, and its layout beats the plain
# one (`torch.utils.mkldnn.MkldnnLinear`) at every row count: 174 ms against 287 ms for a lone 16-token request.
PACKED_FOR_ROWS = 32


class OneDnnLinear(nn.Module):
    """`nn.Linear` on oneDNN: the weight reordered once into oneDNN's blocked layout, inputs stay plain tensors.

    Through torch's own ops for this (`mkldnn._reorder_linear_weight` and `mkldnn._linear_pointwise`, those that
    `torch.compile` emits for a Linear on CPU), so no input or output is converted per call, unlike `MkldnnLinear`.
    `gelu` ("tanh" or "none", the exact erf form) applies that GELU to the output inside the same oneDNN call, as
    `torch.compile` fuses it (see `fuse_gelu`).
    """

    in_features: int
    out_features: int
    packed_weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: "nn.Linear | OneDnnLinear", gelu: Literal["tanh", "none"] | None = None):
        """From a Linear, or from another `OneDnnLinear` (its packed weight shared) to fuse `gelu`."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if isinstance(linear, OneDnnLinear):
            packed = linear.packed_weight
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), PACKED_FOR_ROWS)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.attribute, self.algorithm = ("none", "") if gelu is None else ("gelu", gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, self.attribute, [], self.algorithm)


class OneRowApart(nn.Module):
    """One Linear layer computed by two kernels: `one_row` for a one-row input (a lone request's decoding step),
    `rows` for every other. `rows` is oneDNN's packing, or the reference's where our kernel takes one row; `one_row`
    is the kernel that measured fastest for one row where it was not `rows`: the reference (`kernels.
    one_row_reference`: the plain Linear, torch's GEMM, in float32 and bfloat16, fbgemm's packing in int8) or, in
    float32 and int8, our matrix-vector kernel (`kernels.one_row_matvec`, server/ml/matvec.py). The price is the
    second copy of the weight."""

    def __init__(self, rows: nn.Module, one_row: nn.Module, in_features: int):
        super().__init__()
        self.rows, self.one_row, self.in_features = rows, one_row, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.one_row(x) if x.numel() == self.in_features else self.rows(x)


# The feed-forward blocks whose first Linear feeds an activation and nothing else (the forward is
# `second(activation(first(x)))`), by the names their transformers modules give the two: GPT-2's `GPT2MLP` and
# DistilBERT's `FFN`.
FEED_FORWARD_NAMES = (("c_fc", "act"), ("lin1", "activation"))


def _gelu_form(activation: nn.Module | None) -> Literal["tanh", "none"] | None:
    """oneDNN's name for the GELU `activation` computes (None: not one oneDNN fuses the same way)."""
    if isinstance(activation, NewGELUActivation | GELUTanh):
        return "tanh"
    if isinstance(activation, GELUActivation) and activation.act is nn.functional.gelu:
        return "none"
    return None


def fuse_gelu(model: nn.Module) -> nn.Module:
    """Compute each feed-forward block's GELU inside the oneDNN call of the Linear before it, in place.

    Why: in a batch's prefill the GELU of GPT-2 (`NewGELUActivation`, five elementwise passes over the widest
    activations) took 8% of a batch of 32 rows in fp32 and 12% in bfloat16 on an Intel Xeon. The fused GELU rounds
    differently from those passes: at most 2.4e-7 apart on GPT-2's shapes in fp32, an eighth of what oneDNN's own
    summation order moves the Linear's output (1.9e-6), so the exactness checks of the oneDNN path cover it.
    """
    for parent in list(model.modules()):
        for first, activation in FEED_FORWARD_NAMES:
            linear, act = getattr(parent, first, None), getattr(parent, activation, None)
            if act is not None and (form := _gelu_form(act)) and (fused := _with_gelu(linear, act, form)):
                setattr(parent, first, fused)
                setattr(parent, activation, nn.Identity())
    return model


def _with_gelu(linear: nn.Module | None, act: nn.Module, form: Literal["tanh", "none"]) -> nn.Module | None:
    """`linear` followed by `act` in one module (None: `linear` has no oneDNN call to take it): a `OneRowApart`
    fuses it into its oneDNN packing and runs its one-row kernel, then `act` itself, or, after our matrix-vector
    kernel, torch's one-pass form of a tanh GELU (`GELUTanh`): that kernel's sums already round otherwise than torch's,
    as oneDNN's fused GELU does, so the exactness checks cover it, and GPT-2's five passes took about 0.3 ms of a
    lone request's 17 ms fp32 step on an AMD EPYC Zen 4."""
    if isinstance(linear, OneDnnLinear) and linear.attribute == "none":
        return OneDnnLinear(linear, gelu=form)
    if isinstance(linear, OneRowApart) and (rows := _with_gelu(linear.rows, act, form)):
        after = GELUTanh() if form == "tanh" and isinstance(linear.one_row, MatVecLinear) else act
        return OneRowApart(rows, nn.Sequential(linear.one_row, after), linear.in_features)
    return None


def onednn_computes(dtype: torch.dtype) -> bool:
    """Whether oneDNN has kernels for Linear layers in `dtype` on this CPU: float32 wherever torch has oneDNN,
    bfloat16 where the CPU has AVX512-BF16 or AMX (oneDNN's own check)."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def linear_onednn(
    model: nn.Module,
    shapes: Collection[tuple[int, int]] | None = None,
    lone_on_torch: Collection[tuple[int, int]] = (),
    lone_on_matvec: Collection[tuple[int, int]] = (),
) -> nn.Module:
    """Every Linear (GPT-2's Conv1D projections and LM head included) computed by oneDNN, in the model's dtype
    (float32, or bfloat16 on a CPU with bf16 units), in place, the GELU after a feed-forward block's first Linear
    fused into it (`fuse_gelu`); with `shapes`, only the Linear layers of those (in, out) shapes (the others stay on
    torch's GEMM); those of `lone_on_torch` keep their plain Linear for one-row inputs too, those of
    `lone_on_matvec` (on oneDNN or not) a copy for our matrix-vector kernel (`OneRowApart`).

    Why: on this project's CPUs torch's default fp32 GEMM is slow at the few rows a decoding step has (GPT-2's LM
    head: 8.1 ms for one row against 1.7 ms with oneDNN's packed weights; 23.6 against 6.3 ms for 32 rows), and a
    decoding step is little else. The precision is the same; only the summation order may differ, so outputs can
    differ in their last bits: greedy output is checked identical to transformers' on the test prompts
    (tests/ml/test_precision.py) and on the benchmark's (docs/performance.md). The weights are repacked once, at load.
    """
    linear_from_conv1d(model)
    untie_output_embeddings(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            shape = (getattr(child, "in_features", 0), getattr(child, "out_features", 0))
            if type(child) is nn.Linear and (shapes is None or shape in shapes):
                packed: nn.Module = OneDnnLinear(child)
                if shape in lone_on_matvec:
                    packed = OneRowApart(packed, MatVecLinear(child), child.in_features)
                elif shape in lone_on_torch:
                    packed = OneRowApart(packed, child, child.in_features)
                setattr(parent, child_name, packed)
            elif type(child) is nn.Linear and shape in lone_on_matvec:
                setattr(parent, child_name, OneRowApart(child, MatVecLinear(child), child.in_features))
    return fuse_gelu(model)


def int8_engines_available() -> bool:
    """Whether this torch build has both quantized engines to choose from (x86 builds do; ARM ones have qnnpack)."""
    return set(INT8_ENGINES) <= set(torch.backends.quantized.supported_engines)


@contextmanager
def quantized_engine(engine: str | None) -> Iterator[None]:
    """torch's quantized engine set to `engine` (None: left as it is) while weights are packed: the packed weight
    keeps its engine's kernels for good, whatever the engine is set to when it is called, so this is global state
    only at load."""
    previous = torch.backends.quantized.engine
    if engine is not None:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def one_call_gelu(model: nn.Module) -> nn.Module:
    """GPT-2's tanh GELU (`NewGELUActivation`, five elementwise passes written in Python) computed by torch's own
    one-pass kernel of the same formula (`GELUTanh`), in place.

    Why: in int8 no oneDNN call can take the GELU in (`fuse_gelu`), and those passes took 14% of a batch of 32 rows
    on an Intel Xeon (AVX-512). Only where outputs already change (int8): the two round differently, by a few units
    in the last place, which fp32's exactness promise does not allow on torch's own kernels.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    return model


def quantize_linear_int8(
    model: nn.Module,
    onednn: Collection[tuple[int, int]] | None = None,
    lone_on_fbgemm: Collection[tuple[int, int]] = (),
    lone_on_matvec: Collection[tuple[int, int]] = (),
) -> nn.Module:
    """Dynamic int8 quantization of every Linear (GPT-2's Conv1D projections and LM head included), in place: int8
    weights per output channel, inputs per call. With `onednn` (shapes, in and out features), those shapes are
    packed for oneDNN's int8 kernels and the others for fbgemm's; without it, for torch's default engine. The
    `lone_on_fbgemm` shapes among `onednn` are packed for both, and a one-row input goes to fbgemm (`OneRowApart`);
    the `lone_on_matvec` shapes, whichever engine packs them, send a one-row input to our int8 matrix-vector kernel.
    GPT-2's GELU becomes torch's one-call form (`one_call_gelu`)."""
    linear_from_conv1d(model)
    untie_output_embeddings(model)
    one_call_gelu(model)
    if onednn is None:
        return _quantize(model, {nn.Linear}, None)
    shapes = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
    }
    apart = {
        name: copy.deepcopy(model.get_submodule(name))
        for name, shape in shapes.items()
        if shape in onednn and shape in lone_on_fbgemm
    }
    _quantize(model, {name for name, shape in shapes.items() if shape in onednn}, "onednn")
    _quantize(model, {name for name, shape in shapes.items() if shape not in onednn}, "fbgemm")
    for name, linear in apart.items():
        # In a Sequential: quantization replaces a model's children, not the model itself.
        one_row = _quantize(nn.Sequential(linear), {nn.Linear}, "fbgemm").get_submodule("0")
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, OneRowApart(getattr(holder, child), one_row, shapes[name][0]))
    for name, shape in shapes.items():
        if shape in lone_on_matvec:
            parent, _, child = name.rpartition(".")
            holder, quantized = model.get_submodule(parent), model.get_submodule(name)
            setattr(holder, child, OneRowApart(quantized, Int8MatVecLinear(quantized), shape[0]))
    return model


class Int8Linear(DynamicLinear):
    """torch's dynamically quantized Linear (int8 weights, each input quantized per call) calling its op directly.

    Why: torch's `forward` calls `torch.ops.quantized.linear_dynamic`, whose Python overload resolution (a check of
    every argument for fake script objects) and a version branch run at every call, 49 times in a decoding step of
    GPT-2, whose lone int8 step takes 9 ms on an AMD EPYC Zen 4 (what this and the lean step's direct calls took
    off: server/ml/decode_step.py). The op and its arguments are the ones torch's `forward` passes for the modules
    it creates now (serialization version 4: `reduce_range`, inputs quantized to 7 bits), so outputs are the same
    bits (tests/ml/test_precision.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LINEAR_DYNAMIC(x, self._packed_params._packed_params, True).to(x.dtype)


LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


@contextmanager
def quantization_warnings_silenced() -> Iterator[None]:
    """torch's deprecation warnings for its quantization APIs (see the module's docstring) silenced, by message, for
    the calls inside only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning
        )
        yield


def _quantize(model: nn.Module, which: set, engine: str | None) -> nn.Module:
    if not which:
        return model
    with quantization_warnings_silenced(), quantized_engine(engine):
        qconfigs = dict.fromkeys(which, per_channel_dynamic_qconfig)
        return quantize_dynamic(model, qconfigs, dtype=torch.qint8, mapping={nn.Linear: Int8Linear}, inplace=True)

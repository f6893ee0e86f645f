"""A float32 Linear layer's one-row product by a kernel of our own (`matvec.cpp`), built for this CPU at first use.

Why: a lone request's decoding step is one-row products over every weight, bound by how fast they are read (GPT-2's
blocks: 340 MB a step). On an AMD EPYC Zen 4 (2 cores) oneDNN's packed product read GPT-2's 48 block weights at 21
to 23 GB/s and torch's GEMM (MKL) at 14, while ggml, llama.cpp's library, read the same 48 products at 28 to 36 GB/s
in the same minutes (a one-off C program against its build), near the machine's 34 GB/s memory probe: its f32 server
decoded a token of GPT-2-124M, LM head included, in 16 to 19 ms where our step took 21. What it does differently is
read several weight rows side by side (tinyBLAS, four per thread): this kernel reads eight, and read at 31 GB/s in
the same script (four: 26, two: 22). A weight it must copy anyway (GPT-2's projections, transposed views of their
Conv1D weights) is copied blocked (`blocked`: eight rows' pieces interleaved, one sequential stream per thread),
which read 3% to 12% faster than in place; a contiguous one (the LM head's) is read in place, not copied.
`server/ml/kernels.py` times it against torch's GEMM and oneDNN for one row at load, and a Linear shape's one-row
calls go to it only where it was the fastest there; rows in batches stay on the kernels chosen for them
(`precision.OneRowApart`), at the price of a second copy of those weights in memory.

In int8 (torch's dynamic quantization, `precision.Int8Linear`) a second kernel of the same form, on a CPU with
AVX512-VNNI, computes a one-row product as fbgemm does: the weight's int8 rows and scales, the input quantized per call
on the grid fbgemm chooses (7 bits, a zero point), the products summed in int32, so its outputs are fbgemm's to float
rounding (`Int8MatVecLinear`). fbgemm reads one weight row at a time: on the Zen 4 it read GPT-2's 48 int8 block
weights at 15 to 18 GB/s, this kernel, eight rows blocked, at 19 to 20.

In bfloat16 (`GENERATOR_DTYPE=bfloat16`, on a CPU with AVX512-BF16) the float32 kernel's form reads bfloat16 weights,
half the bytes: one AVX512-BF16 instruction multiplies 32 pairs exactly and sums them in float32, and each output is
rounded to bfloat16 once, as oneDNN's bf16 kernels compute. On the Zen 4 it computed one row of GPT-2's four block
shapes 1.5x to 2.7x faster than oneDNN's packed bf16 product (each timed alone, its weight in cache); the LM head, read
in place from memory, took 4.3 to 4.8 ms against oneDNN's 3.3 to 3.8, so its row stays on oneDNN there.

Its sums run in another order than torch's and oneDNN's (16 lanes, then across them), so its outputs may differ from
theirs in their last bits, as theirs do from each other's: greedy output is checked identical to transformers' on the
test prompts (tests/ml/test_kernels.py) and on the bench's.

Built by torch's C++ extension loader (a C++ compiler, ninja, the Python headers) into torch's extension directory
(`TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions), once per machine: about 35 s at the first start on 2 cores,
a second after. The build targets the CPU it runs on (`-march=native`) and is named after the CPU's model and flags,
the Python and torch it is built for and the source, so a cache carried to another CPU builds again rather than run
instructions that CPU lacks. Where it cannot be built (no compiler: the reason is logged and given with the kernel
choice), the kernels are chosen without it.
"""

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

import torch
from filelock import FileLock
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from server.ml.cpu import cpu_info

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("matvec.cpp")
# matvec.cpp's block: rows computed side by side, the float32 lanes of one vector, the int8 bytes of one.
ROWS, LANES, BYTES = 8, 16, 64


class Kernels(Protocol):
    """The built extension (matvec.cpp)."""

    matvec: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]
    matvec_int8: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor
    ]
    int8_units: bool
    bf16_units: bool


# The kernel's forms by the arithmetic they compute: float32 wherever it is built; bfloat16 and int8 on the CPU
# units their instructions need (the module attribute that says the build has them, and what the units are called).
Form = Literal["float32", "bfloat16", "int8"]
UNITS: dict[Form, tuple[str, str]] = {
    "bfloat16": ("bf16_units", "AVX512-BF16"),
    "int8": ("int8_units", "AVX512-VNNI"),
}
# The values of a weight's blocked piece: one vector's worth (16 float32, 32 bfloat16, 64 int8).
PIECES: dict[Form, int] = {"float32": LANES, "bfloat16": 2 * LANES, "int8": BYTES}
FLOAT_FORMS: dict[torch.dtype, Form] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@cache
def source_digest() -> str:
    """What identifies the kernels' source: a changed kernel is built, and timed, again."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


@cache
def build() -> tuple[Kernels | None, str]:
    """The kernels (`matvec(x, weight, bias, out)`: one row `x` through `weight`, float32 or, where `bf16_units`,
    bfloat16, [out, in] contiguous or `blocked`; `matvec_int8`, where `int8_units`) and how they were had, or None and
    why not. Built once per process; torch's loader reuses an earlier build."""
    cpu, flags = cpu_info()
    identity = "\n".join([cpu, *sorted(flags), sys.version, torch.__version__, source_digest()])
    digest = hashlib.sha256(identity.encode()).hexdigest()
    name = f"server_matvec_{digest[:12]}"
    try:
        # Imported here: the loader brings setuptools in, which a process that builds nothing need not load.
        from torch.utils import cpp_extension

        directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
        directory.mkdir(parents=True, exist_ok=True)
        # torch's loader serialises builds with a lock file that a process killed mid-build leaves behind, and
        # every later load then waits on it forever. An OS lock dies with its process: whoever holds this one is
        # the only builder, so a lock file found under it is stale.
        with FileLock(directory.parent / f"{name}.lock"):
            (directory / "lock").unlink(missing_ok=True)
            module = cpp_extension.load(
                name,
                [str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
            )
    except (RuntimeError, OSError, ImportError) as exc:
        reason = f"not built ({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})"
        log.warning("our matrix-vector kernel %s: one-row products stay on torch's GEMM and oneDNN", reason)
        return None, reason
    return module, "built for this CPU"


def has(form: Form) -> bool:
    """Whether the kernel is here in `form`."""
    kernels = build()[0]
    return kernels is not None and (form not in UNITS or bool(getattr(kernels, UNITS[form][0])))


def unavailable(form: Form) -> str:
    """Why the kernel is not here in `form`."""
    kernels, reason = build()
    return reason if kernels is None or form not in UNITS else f"has no {form} form on this CPU (no {UNITS[form][1]})"


def blocked(weight: torch.Tensor, piece: int) -> torch.Tensor:
    """`weight` [out, in] in the kernel's blocked layout: [out/8, in/piece, 8, piece], zero-padded to whole blocks
    (`PIECES`)."""
    out, width = weight.shape
    rows, columns = -(-out // ROWS) * ROWS, -(-width // piece) * piece
    if (rows, columns) != (out, width):
        padded = weight.new_zeros(rows, columns)
        padded[:out, :width] = weight
        weight = padded
    # One copy from the (possibly transposed) weight itself: a padded or reshaped intermediate would be a second
    # allocation of the weight's size, which the process keeps as heap afterwards.
    return (
        weight.unflatten(0, (rows // ROWS, ROWS))
        .unflatten(2, (columns // piece, piece))
        .permute(0, 2, 1, 3)
        .contiguous()
    )


def _kernels(form: Form) -> Kernels:
    kernels = build()[0]
    if kernels is None or not has(form):
        raise RuntimeError(f"our matrix-vector kernel {unavailable(form)}")
    return kernels


class MatVecLinear(nn.Module):
    """An `nn.Linear` in float32 or bfloat16 for one-row inputs only, on the kernel above: its weight read in place
    where it is one contiguous [out, in] matrix, else a `blocked` copy (GPT-2's projections, whose weights are
    transposed views)."""

    in_features: int
    out_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        form = FLOAT_FORMS.get(weight.dtype)
        if form is None:
            raise TypeError(f"our matrix-vector kernel computes float32 or bfloat16, not {weight.dtype}")
        self.kernel = _kernels(form).matvec
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer(
            "weight", weight if weight.is_contiguous() else blocked(weight, PIECES[form]), persistent=False
        )
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias, self.out_features)


class Int8MatVecLinear(nn.Module):
    """A dynamically quantized Linear (torch's, per-channel int8 weights) for one-row inputs only, on the int8 kernel:
    its int8 weight `blocked` in 64-byte pieces, its rows' scales, and their sums (what the input's zero point
    subtracts)."""

    in_features: int
    out_features: int
    weight: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, quantized: nn.Module):
        super().__init__()
        if not isinstance(quantized, DynamicLinear):
            raise TypeError(f"our int8 kernel takes a dynamically quantized Linear, not {type(quantized).__name__}")
        self.kernel = _kernels("int8").matvec_int8
        weight = quantized.weight()
        if weight.qscheme() != torch.per_channel_affine or bool(weight.q_per_channel_zero_points().any()):
            raise ValueError("our int8 kernel takes per-channel int8 weights without zero points")
        values = weight.int_repr()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.register_buffer("weight", blocked(values, PIECES["int8"]), persistent=False)
        self.register_buffer("scales", weight.q_per_channel_scales().float().contiguous(), persistent=False)
        self.register_buffer("sums", values.sum(dim=1, dtype=torch.int32), persistent=False)
        bias = quantized.bias()
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.scales, self.sums, self.bias, self.out_features)

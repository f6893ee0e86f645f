"""Which kernels compute a model's Linear layers on this CPU, chosen by measuring them, not assumed.

oneDNN with packed weights (`precision.OneDnnLinear`) is about 2x torch's default GEMM for a decoding step on the AMD
EPYC (AVX2) machines this project was tuned on, but a lone request ran 1.11x slower with it on an Intel Xeon (AVX-512,
AMX). So under `*_FP32_KERNELS=auto` each distinct Linear shape of the model (in and out features) is timed with both
kernels at the row counts the model sees (for the generator: one row, a lone request's decoding step, and a full batch),
and gets whichever costs the model less. Each row count weighs the same: a shape's time at it is taken as a share of the
whole model's time there (all shapes on torch, each counted once per layer), so a lone request's latency counts as much
as a batch's throughput. A oneDNN shape whose one-row calls torch computes faster keeps its plain Linear too and sends
one row to it (`one_row_reference`, `precision.OneRowApart`), so its one-row cost is the lesser of the two. A third
kernel is timed for one row only, our own matrix-vector product (server/ml/matvec.py, where this machine could build it:
in float32; in bfloat16 where the CPU has AVX512-BF16; in int8 where it has AVX512-VNNI), and takes a shape's one-row
calls, whichever kernel has its other rows, where it was the fastest there (`one_row_matvec`): on an AMD EPYC Zen 4 all
five GPT-2 shapes in float32 and int8. Before it existed, on the AMD EPYC (AVX2) machine, GPT-2-124M's 768x768
projection went to torch (oneDNN 0.04 ms slower for one row, about even overall) and its four other shapes to oneDNN; on
an Intel Xeon (AVX-512, AMX) all five went to oneDNN, four of them with one row on torch. The choice is a pure function
of the timings (`choose`), so it is tested with injected timings; the timings are cached per CPU model, ISA flags, torch
build, thread count, dtype, shapes and (where it is timed) our kernel's source, under `MODELS_CACHE_DIR/kernels/`, so
only the first start on a machine pays the measurement (for GPT-2-124M on an AMD EPYC Zen 4: 3 s in fp32 and bfloat16,
15 s in int8, whose weights are quantized copy by copy). Each shape is timed on its weights read from memory, as a
decoding step reads them (`seconds`, `streamed_copies`).

Both kernels compute in the model's dtype (float32, or bfloat16 on a CPU with bf16 units, where oneDNN runs it on
the AMX tiles); only the summation order differs, so outputs may differ in their last bits: greedy output is checked
identical to transformers' whatever the mix (tests/ml/test_kernels.py).

An int8 model's Linear layers are chosen the same way, always (no setting: it is a speed choice only), between
torch's two quantized engines: fbgemm, the reference, and oneDNN, whose int8 kernels use AVX512-VNNI and AMX where the
CPU has them. Both quantize the same way (per-channel int8 weights, each input per call); only the summation order
differs. On the AMD EPYC (AVX2) machine fbgemm won every GPT-2 shape (oneDNN 1.3x to 3.3x slower). Our int8 kernel
quantizes as fbgemm does, too.
"""

import copy
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import skip_init
from transformers.pytorch_utils import Conv1D

from server.ml import matvec
from server.ml.cpu import cpu_info, largest_cache_bytes
from server.ml.matvec import Int8MatVecLinear, MatVecLinear
from server.ml.precision import INT8_ENGINES, OneDnnLinear, Precision, ServedKernels, quantize_linear_int8

log = logging.getLogger(__name__)

Shape = tuple[int, int]  # (in_features, out_features)
# The extensions that decide which kernels are fast (as /proc/cpuinfo names them): AVX2/FMA (fp32), AVX-512 and its
# VNNI (int8) and BF16 forms, AMX (bf16 and int8 matrix units).
ISA_FLAGS = frozenset(
    {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}
)
REPEATS = 15
# The most copies of one weight timed (`streamed_copies`): GPT-2's smallest int8 weight, 0.6 MB, takes 109 to pass
# twice 32 MiB.
MOST_COPIES = 256
TIMED = "streamed copies"
# The kernels timed against each other per precision: the reference (a tie goes to it), then oneDNN.
CANDIDATES: dict[Precision, tuple[ServedKernels, ServedKernels]] = {"fp32": ("torch", "onednn"), "int8": INT8_ENGINES}
# Timed for one row only, beside the two of a float32 or int8 model: our matrix-vector kernel (server/ml/matvec.py),
# where built (in int8, where the CPU has AVX512-VNNI).
ONE_ROW = "matvec"
WHO = {"torch": "torch's GEMM", "fbgemm": "fbgemm's int8 GEMM", ONE_ROW: "our matrix-vector kernel"}


@dataclass(frozen=True)
class KernelChoice:
    """oneDNN for `onednn` (the shapes it won), the `reference` kernels (torch's GEMM in fp32, fbgemm in int8) for
    the rest; `reason` says how it was decided. `lone_on_reference`: the oneDNN shapes whose one-row calls (a lone
    request's decoding step) still run on the reference because it was faster there (`one_row_reference`);
    `lone_on_matvec`, the shapes, oneDNN's or the reference's, whose one-row calls run on our matrix-vector kernel
    (`one_row_matvec`)."""

    onednn: frozenset[Shape]
    shapes: frozenset[Shape]
    reason: str
    reference: ServedKernels = "torch"
    lone_on_reference: frozenset[Shape] = frozenset()
    lone_on_matvec: frozenset[Shape] = frozenset()

    @property
    def summary(self) -> ServedKernels:
        """`onednn`, the reference, or `mixed` (some shapes each)."""
        if self.onednn == self.shapes:
            return "onednn"
        return "mixed" if self.onednn else self.reference


def linear_shapes(model: nn.Module) -> dict[Shape, int]:
    """The distinct (in, out) shapes of the model's Linear layers (GPT-2's Conv1D projections included), in order,
    with how many layers have each."""
    shapes: dict[Shape, int] = {}
    for module in model.modules():
        if type(module) is nn.Linear:
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            shape = (module.nx, module.nf)
        else:
            continue
        shapes[shape] = shapes.get(shape, 0) + 1
    return dict(sorted(shapes.items()))


def choose(
    timings: dict[Shape, dict[int, dict[str, float]]],
    layers: dict[Shape, int],
    reference: str = "torch",
) -> frozenset[Shape]:
    """The shapes oneDNN costs the model less on (`timings[shape][rows][kernel]`, seconds of one call; `layers`,
    how many layers have each shape): summed over the row counts, each as a share of the model's time at that row
    count on the `reference` kernels. A tie goes to the reference. A shape's one-row calls run on whichever kernel is
    fastest there, our matrix-vector kernel included (`one_row_matvec`), and a oneDNN shape's on the reference too
    where it is (`one_row_reference`): at one row a kernel costs the least of the times it may hand the row to."""
    model_time: dict[int, float] = {}
    for shape, by_rows in timings.items():
        for rows, times in by_rows.items():
            model_time[rows] = model_time.get(rows, 0.0) + layers.get(shape, 1) * times[reference]

    def cost(by_rows: dict[int, dict[str, float]], kernel: str) -> float:
        def paid(rows: int, times: dict[str, float]) -> float:
            if rows != 1:
                return times[kernel]
            return min(time for name, time in times.items() if name in (kernel, ONE_ROW) or kernel == "onednn")

        return sum(paid(rows, times) / model_time[rows] for rows, times in by_rows.items() if model_time[rows] > 0)

    return frozenset(
        shape for shape, by_rows in timings.items() if by_rows and cost(by_rows, "onednn") < cost(by_rows, reference)
    )


def one_row_reference(
    timings: dict[Shape, dict[int, dict[str, float]]], onednn: frozenset[Shape], reference: str = "torch"
) -> frozenset[Shape]:
    """The oneDNN shapes that the `reference` kernels compute fastest for one row.

    A lone request reads every weight once per token, so its Linear calls are bound by memory: on an Intel Xeon
    (AVX-512) torch's GEMM read GPT-2's weights at 30 GB/s for one row against oneDNN's 24 GB/s with weights packed
    for 32 rows, while oneDNN was 1.1x to 1.3x faster for 32 rows; in int8, fbgemm was 12% to 21% faster than oneDNN
    for one row, while oneDNN's AMX kernels were 2x to 3x faster for a batch's prefill (1024 rows). Those shapes keep
    a second copy of their weight for the reference and call it for one row (`precision.OneRowApart`), at the price
    of that copy in memory.
    """
    return frozenset(shape for shape in onednn if _fastest_one_row(timings[shape]) == reference)


def one_row_matvec(timings: dict[Shape, dict[int, dict[str, float]]], onednn: frozenset[Shape]) -> frozenset[Shape]:
    """The shapes whose one-row calls our matrix-vector kernel (server/ml/matvec.py) computes fastest: against all
    three kernels for a oneDNN shape, against the reference for the others (they hold no oneDNN packing). A second
    copy of their weight for it, as for `one_row_reference`."""
    return frozenset(
        shape for shape, by_rows in timings.items() if _fastest_one_row(by_rows, everything=shape in onednn) == ONE_ROW
    )


def _fastest_one_row(by_rows: dict[int, dict[str, float]], everything: bool = True) -> str | None:
    """The kernel timed fastest for one row (a tie goes to the first timed: the reference, then oneDNN), among all
    of them or (`everything` false) all but oneDNN; None where one row was not timed."""
    times = by_rows.get(1)
    if times is None:
        return None
    allowed = {name: time for name, time in times.items() if everything or name != "onednn"}
    return min(allowed, key=allowed.__getitem__)


def seconds(runs: Sequence[Callable[[torch.Tensor], object]], x: torch.Tensor) -> float:
    """Median seconds of one call, each on the next of `runs` in turn, after one call on each that is not counted.

    `runs` are one kernel on several copies of a weight (`streamed_copies`): a decoding step reads each weight from
    memory, not from the cache that calls on one copy would keep it in, and the kernels' order can differ there. On
    an AMD EPYC Zen 4 (32 MiB of cache) our int8 kernel took 30 us to fbgemm's 45 for one row of 3072x768 in cache,
    100 to 116 read from memory; in bfloat16, at 768x2304, it tied oneDNN in cache (83 us) and led it from memory
    (254 to 264)."""
    with torch.inference_mode():
        for run in runs:
            run(x)  # the first call allocates and dispatches; it is not what a decoding step pays
        samples = []
        for call in range(REPEATS):
            start = time.perf_counter()
            runs[call % len(runs)](x)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def streamed_copies(shape: Shape, layers: dict[Shape, int], weight_bytes: int) -> int:
    """How many copies of a weight of `shape` to time it on: as many as a decoding step reads between two reads of
    it (every Linear weight of the model, `layers` of each shape, `weight_bytes` a value), but no more than pass
    twice the CPU's largest cache (nor `MOST_COPIES`), beyond which every one is read from memory anyway. A model
    that fits in the cache is timed in it, as its steps run."""
    each = shape[0] * shape[1] * weight_bytes
    model = sum(count * i * o for (i, o), count in layers.items()) * weight_bytes
    return max(1, min(MOST_COPIES, -(-min(model, 2 * largest_cache_bytes()) // each)))


def candidates(linear: nn.Linear, precision: Precision, one_row: bool) -> dict[str, nn.Module]:
    """`linear` computed by each of `precision`'s candidate kernels (copies: `linear` is left as it is). In `fp32`
    the kernels compute in the Linear's own dtype (float32, or bfloat16 on a CPU with bf16 units); each also by our
    matrix-vector kernel where it is here in that form and `one_row` inputs are to be timed (`ONE_ROW`)."""
    with_one_row = one_row and _one_row_offered(precision, linear.weight.dtype)
    if precision == "fp32":
        kernels: dict[str, nn.Module] = {"torch": linear, "onednn": OneDnnLinear(linear)}
        if with_one_row:
            kernels[ONE_ROW] = MatVecLinear(linear)
        return kernels
    shape = (linear.in_features, linear.out_features)
    # In a Sequential: quantization replaces a model's children, not the model itself.
    fbgemm = quantize_linear_int8(nn.Sequential(copy.deepcopy(linear)), onednn=())
    kernels = {"fbgemm": fbgemm, "onednn": quantize_linear_int8(nn.Sequential(copy.deepcopy(linear)), onednn={shape})}
    if with_one_row:
        kernels[ONE_ROW] = Int8MatVecLinear(fbgemm.get_submodule("0"))
    return kernels


def measure(
    layers: dict[Shape, int], rows: Sequence[int], precision: Precision = "fp32", dtype: torch.dtype = torch.float32
) -> dict[Shape, dict[int, dict[str, float]]]:
    """Median seconds of one call per shape (`layers`: the model's Linear shapes, how many layers have each), row
    count and kernel, on random weights of that shape in `dtype`, as far from the cache as a decoding step reads them
    (`streamed_copies` of each, built one after another: none is left to the next shape)."""
    generator = torch.Generator().manual_seed(0)
    weight_bytes = 1 if precision == "int8" else dtype.itemsize
    timings: dict[Shape, dict[int, dict[str, float]]] = {}
    for shape in layers:
        in_features, out_features = shape
        copies = []
        for _ in range(streamed_copies(shape, layers, weight_bytes)):
            # Not initialised: its weights are drawn here.
            linear = skip_init(nn.Linear, in_features, out_features)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
                linear.bias.copy_(torch.randn(out_features, generator=generator) * 0.02)
            copies.append(candidates(linear.to(dtype), precision, one_row=1 in rows))
        timings[shape] = {}
        for count in rows:
            x = torch.randn(count, in_features, generator=generator).to(dtype)
            timings[shape][count] = {
                name: seconds([kernels[name] for kernels in copies], x)
                for name in copies[0]
                if count == 1 or name != ONE_ROW
            }
    return timings


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and its `ISA_FLAGS`, as /proc/cpuinfo names them (elsewhere: the platform's name)."""
    model, flags = cpu_info()
    return model, sorted(flags & ISA_FLAGS)


def _one_row_form(precision: Precision, dtype: torch.dtype) -> matvec.Form | None:
    """Our matrix-vector kernel's form for `precision`'s Linear layers in `dtype` (None: it has none)."""
    return "int8" if precision == "int8" else matvec.FLOAT_FORMS.get(dtype)


def _one_row_offered(precision: Precision, dtype: torch.dtype) -> bool:
    form = _one_row_form(precision, dtype)
    return form is not None and matvec.has(form)


def cpu_identity() -> dict[str, object]:
    """What the timings depend on besides the shapes: the CPU, its kernel-relevant flags, torch, threads."""
    cpu, flags = cpu_model_and_flags()
    return {"cpu": cpu, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads()}


def measured_choice(
    model: nn.Module, rows: Sequence[int], cache_dir: Path | None, precision: Precision = "fp32"
) -> KernelChoice:
    """The kernels for `model`'s Linear shapes in `precision` (in fp32: in the model's dtype, float32 or
    bfloat16) on this CPU, measured once and cached in `cache_dir` (None: not cached). An unreadable cache file is
    measured again and rewritten."""
    shapes = linear_shapes(model)
    identity = cpu_identity()
    reference, _ = CANDIDATES[precision]
    dtype = next(model.parameters()).dtype if precision == "fp32" else torch.float32
    # What the reason calls the arithmetic: fp32 weights computed in float32 unless the model is bfloat16.
    label = str(dtype).removeprefix("torch.") if dtype != torch.float32 else precision
    # Our one-row kernel only where one row is timed: a classifier never sees one, and is neither built for nor
    # wrapped in it.
    one_row = 1 in rows and _one_row_offered(precision, dtype)
    key = {
        **identity,
        "precision": label,
        "kernels": [*CANDIDATES[precision], *([ONE_ROW] if one_row else [])],
        # How the timings were taken: those taken otherwise (on weights in cache, before 2026-12-08) are taken again.
        "timed": TIMED,
        # Our kernel's timings hold for its source only (torch's kernels are keyed by torch's version).
        **({"one_row_source": matvec.source_digest()} if one_row else {}),
        "shapes": [[*shape, count] for shape, count in shapes.items()],
        "rows": list(rows),
    }
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir / "kernels" / f"{digest}.json"
    timings = _cached(path, CANDIDATES[precision])
    source = "cached"
    if timings is None or set(timings) != set(shapes):
        started = time.perf_counter()
        timings = measure(shapes, rows, precision, dtype)
        source = f"measured in {time.perf_counter() - started:.1f} s"
        if path is not None:
            _store(path, key, timings)
    onednn = choose(timings, shapes, reference)
    lone, lone_matvec = one_row_reference(timings, onednn, reference), one_row_matvec(timings, onednn)
    alone = f", {len(lone)} of them on {WHO[reference]} for one row" if lone else ""
    if lone_matvec:
        alone += f", {len(lone_matvec)} on {WHO[ONE_ROW]} for one row"
    if 1 in rows and not one_row and (form := _one_row_form(precision, dtype)) is not None:
        alone += f"; {WHO[ONE_ROW]} {matvec.unavailable(form)}"
    reason = (
        f"{label}: oneDNN where it beat {WHO[reference]} over {' and '.join(map(str, rows))} rows on "
        f"{identity['cpu']} ({len(onednn)} of {len(shapes)} Linear shapes{alone}; {source})"
    )
    return KernelChoice(onednn, frozenset(shapes), reason, reference, lone, lone_matvec)


def _cached(path: Path | None, kernels: Sequence[str]) -> dict[Shape, dict[int, dict[str, float]]] | None:
    if path is None or not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())["timings"]
        return {
            (int(entry["in"]), int(entry["out"])): {
                int(count): _timed(t, kernels) for count, t in entry["rows"].items()
            }
            for entry in stored
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("kernel timings %s unreadable (%s): measuring again", path, exc)
        return None


def _timed(times: dict, kernels: Sequence[str]) -> dict[str, float]:
    """One row count's stored timings: every kernel timed at every row count, and our matrix-vector kernel's for
    one row where it was."""
    if missing := set(kernels) - set(times):
        raise KeyError(f"no timing for {', '.join(sorted(missing))}")
    return {kernel: float(seconds_) for kernel, seconds_ in times.items() if kernel in kernels or kernel == ONE_ROW}


def _store(path: Path, key: dict, timings: dict[Shape, dict[int, dict[str, float]]]) -> None:
    entries = [
        {"in": i, "out": o, "rows": {str(n): t for n, t in by_rows.items()}} for (i, o), by_rows in timings.items()
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"key": key, "timings": entries}, indent=1))
        partial.replace(path)
    except OSError as exc:
        log.warning("kernel timings not cached in %s (%s): the next start measures again", path, exc)

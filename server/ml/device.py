"""Where a model runs (`DEVICE`) and in which floating-point type (`GENERATOR_DTYPE`, `SENTIMENT_DTYPE`).

`auto` picks CUDA when torch sees a GPU, else the CPU; on a GPU the dtype `auto` is bfloat16 where the GPU computes
it natively, else float16, and on the CPU float32, as the server always ran. Settings that exist for one device
only are refused on the other with one line, never ignored: the oneDNN fp32 kernels and int8 dynamic quantization
are CPU code, float16 on the CPU is slower than float32 there (no fast kernels in eager mode) while changing
outputs, and so is bfloat16 except on CPUs with AVX512-BF16 or AMX, where it is opt-in (`*_DTYPE=bfloat16`) like int8.

A model's name and cache revision carry the device class and dtype (`gpt2:cuda:bfloat16`) wherever its outputs can
differ from the CPU float32 ones, as `:int8` does: answers computed on one never serve as the other's. CPU float32
names stay those of a server without these settings.
"""

import os
import re
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch

from server.core.config import Settings, settings_conflict
from server.ml.kernels import cpu_model_and_flags
from server.ml.precision import Kernels

DTypeSetting = Literal["auto", "float32", "float16", "bfloat16"]
DTYPE_SETTINGS: tuple[str, ...] = get_args(DTypeSetting)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")
CPU_BATCH_MAX_SIZE = 32
GPU_BATCH_MAX_SIZE = 256
# The share of a GPU's free memory (after the weights are loaded) the default batch size may plan for: the rest is
# left to the allocator's fragmentation, the prefill's activations and whatever else runs on the GPU.
GPU_MEMORY_SHARE = 0.5


class DeviceRefused(RuntimeError):
    """The device or dtype settings cannot run here, or contradict each other: one line says which and what to do."""


@dataclass(frozen=True)
class Placement:
    """The device a model runs on and the dtype it computes in."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def suffix(self) -> str:
        """What the model's name and revision gain: nothing on the CPU in float32 (outputs as ever), else
        `:<device class>:<dtype>`. The device index is left out: any GPU of one class computes the same."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return ""
        return f":{self.device.type}:{self.dtype_name}"


CPU_FLOAT32 = Placement(torch.device("cpu"), torch.float32)


def resolve_device(setting: str) -> torch.device:
    """The torch device `DEVICE` names on this machine; `DeviceRefused` when it names a GPU torch cannot use."""
    if not DEVICE_FORM.fullmatch(setting):
        raise DeviceRefused(f"DEVICE={setting!r}: expected auto, cpu, cuda or cuda:N")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA" if torch.version.cuda is None else "sees no GPU"
            raise DeviceRefused(
                f"DEVICE={setting} but this torch ({torch.__version__}) {build}: install the CUDA "
                "build of torch (docs/gpu.md) or set DEVICE=cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceRefused(
                f"DEVICE={setting} but torch sees {torch.cuda.device_count()} GPU(s): "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def resolve(role: str, device: str, dtype: str, precision: str, kernels: str) -> Placement:
    """Where and in which dtype a model runs: the settings resolved on this machine, contradictions refused (the
    ones only `auto` reveals included: int8 or oneDNN where `auto` found a GPU)."""
    placed = resolve_device(device)
    resolved_device = "cuda" if placed.type == "cuda" else "cpu"
    if problem := settings_conflict(role, resolved_device, dtype, precision, kernels):
        raise DeviceRefused(problem if device != "auto" else f"{problem} (DEVICE=auto found a {placed.type} device)")
    if placed.type == "cpu" and dtype == "bfloat16" and not cpu_has_bf16():
        cpu, flags = cpu_model_and_flags()
        raise DeviceRefused(
            f"{role}_DTYPE=bfloat16 needs a CPU with AVX512-BF16 or AMX, where it runs on the matrix units; this "
            f"one ({cpu}: {', '.join(flags) or 'no AVX'}) would compute it slower than float32: set "
            f"{role}_DTYPE=auto or float32"
        )
    return Placement(placed, resolve_dtype(dtype, placed))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_model_and_flags()[1]))


def placements(settings: Settings) -> tuple[Placement, Placement]:
    """The generator's and the classifier's placements under these settings on this machine (`DeviceRefused`)."""
    return (
        resolve(
            "GENERATOR",
            settings.device,
            settings.generator_dtype,
            settings.generator_precision,
            settings.generator_fp32_kernels,
        ),
        resolve(
            "SENTIMENT",
            settings.device,
            settings.sentiment_dtype,
            settings.sentiment_precision,
            settings.sentiment_fp32_kernels,
        ),
    )


def memory(device: torch.device) -> dict[str, object]:
    """The device and its memory: a GPU's as the driver counts it (every process's use), the CPU's as the
    system does (`MemAvailable`)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "device": str(device),
            "name": torch.cuda.get_device_name(device),
            "memory_used_bytes": total - free,
            "memory_free_bytes": free,
            "memory_total_bytes": total,
        }
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = _mem_available() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return {
        "device": "cpu",
        "name": "cpu",
        "memory_used_bytes": total - free,
        "memory_free_bytes": free,
        "memory_total_bytes": total,
    }


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def row_bytes(config: object, dtype: torch.dtype) -> int:
    """The memory one full-length row of a causal LM holds: its keys and values at every layer for the whole context,
    and its float32 logits over the vocabulary."""

    def size(name: str, other: str = "") -> int:
        return int(getattr(config, name, None) or getattr(config, other))

    layers, width = size("n_layer", "num_hidden_layers"), size("n_embd", "hidden_size")
    context, vocab = size("n_positions", "max_position_embeddings"), size("vocab_size")
    return 2 * layers * width * context * dtype.itemsize + 4 * vocab


def default_batch_max_size(placement: Placement, config: object) -> int:
    """`SCHEDULER_MAX_SIZE` when unset: 32 on the CPU (measured there, docs/performance.md); on a GPU as many
    full-length rows as half its free memory holds, at most 256."""
    if placement.device.type != "cuda":
        return CPU_BATCH_MAX_SIZE
    free, _ = torch.cuda.mem_get_info(placement.device)
    return max(1, min(GPU_BATCH_MAX_SIZE, int(free * GPU_MEMORY_SHARE) // row_bytes(config, placement.dtype)))


def kernels_for(setting: str, placement: Placement) -> Kernels:
    """`*_FP32_KERNELS` resolved: `auto` is measured on the CPU (server/ml/kernels.py) and torch's own GEMM on a
    GPU."""
    if setting == "auto" and placement.device.type == "cuda":
        return "torch"
    return cast(Kernels, setting)

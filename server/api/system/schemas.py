"""The bodies of `/` and the health probes."""

from typing import Literal

from pydantic import BaseModel, Field

from server.ml.precision import ServedKernels


class CheckOut(BaseModel):
    status: Literal["ok", "degraded", "down"]
    latency_ms: float
    detail: dict = {}


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "down"]
    checks: dict[str, CheckOut]


class ModelInfo(BaseModel):
    name: str = Field(
        description="The `model_name` of answers: the model id, with `:int8` when served in int8 and "
        "`:<device>:<dtype>` unless on the CPU in float32 (e.g. `gpt2:cuda:bfloat16`)"
    )
    revision: str = Field(description="The weights served (checkpoint revision, with the same suffixes as `name`)")
    precision: Literal["fp32", "int8"] = Field(description="GENERATOR_PRECISION or SENTIMENT_PRECISION")
    kernels: ServedKernels = Field(
        description="Who computes the Linear layers: in fp32 oneDNN, torch's default GEMM, or each where it was "
        "faster on this CPU (GENERATOR_FP32_KERNELS, SENTIMENT_FP32_KERNELS); in int8 oneDNN's or fbgemm's int8 "
        "kernels, or each where it was faster (always measured)"
    )
    kernels_reason: str = Field(description="Why: measured on this CPU (auto, and with what result), or as set")
    memory_pages: str = Field(
        description="How much of the memory the model's load allocated was moved onto 2 MiB pages (on the CPU), or why "
        "none was"
    )
    head_screen: str = Field(
        description="Whether a greedy one-row decoding step picks its token from an int8 screen of the LM head and "
        "its candidates' exact float32 logits instead of the full head (the same token), with the timings that "
        "decided it at load, or why not"
    )
    device: str = Field(description="Where the model runs: cpu, or cuda:N (DEVICE)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(description="GENERATOR_DTYPE or SENTIMENT_DTYPE, resolved")
    offline_stand_in: bool


class DeviceInfo(BaseModel):
    device: str
    name: str = Field(description="The GPU's name, or cpu")
    memory_used_bytes: int = Field(description="In use on the device now, by every process (the CPU: the system's)")
    memory_free_bytes: int
    memory_total_bytes: int


class AppInfo(BaseModel):
    name: str
    version: str
    models: dict[str, ModelInfo]
    devices: dict[str, DeviceInfo] = Field(description="Each device a model runs on, and its memory now")
    cache: dict
    docs: str = "/docs"

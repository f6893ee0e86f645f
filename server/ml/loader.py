"""Finding model weights: a local directory, the hub cache, the hub, or (in `auto` mode) offline stand-ins.

`MODEL_SOURCE` decides:
- `local`: a directory or the cache under `models_cache/`, never the network;
- `hub`: download into the cache when missing, fail with a clear message when that is impossible;
- `auto`: cache, then hub, then, when the hub cannot be reached, stand-ins built by `offline.py`.
"""

import hashlib
import json
import logging
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Self
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoTokenizer
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from server.ml import offline
from server.ml.allocator import Pages, on_huge_pages
from server.ml.device import CPU_BATCH_MAX_SIZE, CPU_FLOAT32, Placement
from server.ml.kernels import measured_choice
from server.ml.precision import (
    Kernels,
    Precision,
    ServedKernels,
    apply_precision,
    int8_engines_available,
    linear_onednn,
    onednn_computes,
    quantize_linear_int8,
    usable_kernels,
)

log = logging.getLogger(__name__)
Kind = Literal["generator", "classifier"]


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded from any source allowed by `MODEL_SOURCE`."""


@dataclass(frozen=True)
class ModelLocation:
    """Where `from_pretrained` should look, and what to call the model in responses."""

    path: str
    name: str
    local_files_only: bool
    standin: bool = False


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: cheap, unlike transformers' own retries (tens of seconds offline)."""
    url = urlparse(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def in_hub_cache(model_id: str, cache_dir: Path) -> bool:
    snapshots = cache_dir / f"models--{model_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(p.joinpath("config.json").exists() for p in snapshots.iterdir())


def standin_info(directory: Path) -> dict | None:
    marker = directory / offline.STANDIN_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def locate(model_id: str, kind: Kind, source: str, cache_dir: Path) -> ModelLocation:
    """Decide where to load `model_id` from, building stand-ins in `auto` mode when the hub is unreachable."""
    directory = Path(model_id)
    if directory.is_dir():
        info = standin_info(directory)
        name = f"offline-stand-in:{info['stands_in_for']}" if info else model_id
        return ModelLocation(str(directory), name, local_files_only=True, standin=info is not None)
    if in_hub_cache(model_id, cache_dir):
        return ModelLocation(model_id, model_id, local_files_only=True)
    if source == "local":
        raise ModelUnavailable(
            f"{kind} model {model_id!r} is neither a directory nor in the cache {cache_dir} and MODEL_SOURCE=local "
            "forbids downloads: run `python -m server models fetch` on a connected machine, or set MODEL_SOURCE=hub"
        )
    if hub_reachable():
        return ModelLocation(model_id, model_id, local_files_only=False)
    if source == "hub":
        raise ModelUnavailable(
            f"{kind} model {model_id!r} is not in the cache {cache_dir} and the hub ({hub_constants.ENDPOINT}) "
            "cannot be reached: connect this machine, copy the model into a local directory and point the "
            "setting at it, or set MODEL_SOURCE=auto to serve offline stand-ins"
        )
    standin_dir = cache_dir / "offline" / kind
    if not offline.standin_marker_exists(standin_dir):
        build = offline.build_generator if kind == "generator" else offline.build_classifier
        build(standin_dir, stands_in_for=model_id)
    log.warning("!" * 78)
    log.warning(
        "%s model %r: the hub cannot be reached and it is not cached; serving an OFFLINE STAND-IN "
        "with RANDOM WEIGHTS from %s. Its outputs are meaningless. Run `python -m server models fetch` "
        "on a connected machine for the real model.",
        kind,
        model_id,
        standin_dir,
    )
    log.warning("!" * 78)
    return ModelLocation(str(standin_dir), f"offline-stand-in:{model_id}", local_files_only=True, standin=True)


def weights_revision(model_config: object, location: ModelLocation) -> str:
    """An identifier that changes whenever the weights do: the hub commit, else a digest of the weight files."""
    commit = getattr(model_config, "_commit_hash", None)
    if commit:
        return str(commit)
    digest = hashlib.sha256()
    for path in sorted(Path(location.path).glob("*.safetensors")) + sorted(Path(location.path).glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class PretrainedModel:
    """A model and its tokenizer, loaded once from a `ModelLocation`; subclasses name their auto class."""

    auto_class: ClassVar[type[_BaseAutoModelClass]]
    # The attention implementation `load` asks for (None: transformers' default for the architecture).
    attention: ClassVar[str | None] = None
    # The rows a Linear layer sees per call, where `auto` kernels are timed: a lone request and a full batch (a
    # decoding step has one row per sequence; a classifier, one per token of every text).
    kernel_rows: ClassVar[tuple[int, ...]] = (1, CPU_BATCH_MAX_SIZE)
    # Whether greedy one-row steps skip the LM head's full product, and why (the generator's: server/ml/screen.py).
    head_screen: str = "off: not a generator"

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        revision: str,
        standin: bool,
        precision: Precision = "fp32",
        kernels: ServedKernels = "torch",
        placement: Placement = CPU_FLOAT32,
        kernels_reason: str = "",
        memory_pages: str = "",
    ):
        """`model` already computes in `precision` on `placement` (see `load`); `name` and `revision` are the
        checkpoint's; `kernels_reason` says why its Linear layers run on `kernels`, `memory_pages` what pages its
        memory sits on (`allocator.on_huge_pages`)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.precision = precision
        self.placement = placement
        self.kernels = kernels
        self.kernels_reason = kernels_reason
        self.memory_pages = memory_pages
        self.tag = ("" if precision == "fp32" else f":{precision}") + placement.suffix
        self.name = f"{name}{self.tag}"
        self.checkpoint_revision = revision
        self.standin = standin
        self._ready()

    def _ready(self) -> None:
        """What a kind of model prepares once its fields are set (the generator: padding, its decoder)."""

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def revision(self) -> str:
        """What cache keys call the weights as served: the checkpoint's revision, plus the precision unless fp32 and
        the device class and dtype unless the CPU's float32.

        int8 weights, or another device or dtype, compute other outputs than the CPU's fp32 weights they came from,
        so their answers never share a key; CPU fp32 keys stay those of a server without these settings.
        """
        return f"{self.checkpoint_revision}{self.tag}"

    @classmethod
    def load(
        cls,
        location: ModelLocation,
        cache_dir: str,
        precision: Precision = "fp32",
        kernels: Kernels = "torch",
        placement: Placement = CPU_FLOAT32,
    ) -> Self:
        """Load the model and tokenizer onto `placement`'s device in its dtype, then convert the model to
        `precision` and, in fp32, `kernels` (seconds, see `precision.py`; both CPU only, see `device.py`). On the
        CPU, the memory all this allocated then moves onto 2 MiB pages (seconds more, see `allocator.py`)."""
        on_cpu = placement.device.type == "cpu"
        with on_huge_pages() if on_cpu else nullcontext(Pages("as the device keeps them")) as pages:
            tokenizer = AutoTokenizer.from_pretrained(
                location.path, cache_dir=cache_dir, local_files_only=location.local_files_only
            )
            model = cls.auto_class.from_pretrained(
                location.path,
                cache_dir=cache_dir,
                local_files_only=location.local_files_only,
                dtype=placement.dtype,
                attn_implementation=cls.attention,
            ).to(placement.device)
            revision = weights_revision(model.config, location)
            kernels = usable_kernels(kernels)
            served: ServedKernels
            if precision == "int8" and int8_engines_available():
                choice = measured_choice(model, cls.kernel_rows, Path(cache_dir), "int8")
                model = quantize_linear_int8(model, choice.onednn, choice.lone_on_reference, choice.lone_on_matvec)
                served, reason = choice.summary, choice.reason
            elif precision == "int8":
                model, served = apply_precision(model, precision), "torch"
                engine = torch.backends.quantized.engine
                reason = f"int8: torch's default quantized engine ({engine}): this torch build lacks fbgemm or oneDNN"
            elif kernels == "auto" and on_cpu and onednn_computes(placement.dtype):
                choice = measured_choice(model, cls.kernel_rows, Path(cache_dir))
                model = linear_onednn(model, choice.onednn, choice.lone_on_reference, choice.lone_on_matvec)
                served = choice.summary
                reason = choice.reason
            else:
                # `auto` left here is a GPU's, or bfloat16's where oneDNN lacks bf16 kernels: torch's own kernels.
                served = "torch" if kernels == "auto" else kernels
                model, reason = (
                    apply_precision(model, precision, served),
                    "as configured (*_FP32_KERNELS; auto is torch's on a GPU, and in bfloat16 without oneDNN's bf16 "
                    "kernels)",
                )
        log.info("%s %s kernels: %s (%s)", location.name, precision, served, reason)
        return cls(
            model,
            tokenizer,
            location.name,
            revision,
            location.standin,
            precision,
            served,
            placement,
            reason,
            pages.summary,
        )

"""The physical limits the server is judged against: each model engine called directly, in this process, no server.

Generator engines (`ENGINES`, a key prefix each): `""` is transformers' `generate` in fp32 with torch's GEMM, the
reference every ratio is taken against; `fast_` is the server's default, our decoding loop with fp32 Linear layers
on the kernels measured fastest on this CPU; `int8_` is our loop on the int8 model (`GENERATOR_PRECISION=int8`);
`bf16_`, on a CPU with bf16 units only, our loop in bfloat16 (`GENERATOR_DTYPE=bfloat16`). The arithmetic yardsticks
(a GEMM probe in each of fp32, int8 and bf16) are measured in the same run.
"""

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.bench.agreement import GreedyReference, label_agreement
from server.core.config import PROJECT_ROOT
from server.ml.classifier import SentimentClassifier
from server.ml.decoding import Sequence
from server.ml.device import DTYPES, Placement, cpu_has_bf16
from server.ml.generator import GenerationParams, TextGenerator
from server.ml.kernels import candidates
from server.ml.loader import locate
from server.ml.precision import PRECISIONS, Kernels, Precision, int8_engines_available, quantize_linear_int8
from server.ml.screen import ScreenedHead

BENCH_MODELS = PROJECT_ROOT / "models_cache" / "bench"
SERVER_TAG = "s"
TOPICS = [
    "rivers",
    "mountains",
    "robots",
    "gardens",
    "markets",
    "oceans",
    "libraries",
    "trains",
    "music",
    "bridges",
    "forests",
    "deserts",
    "cities",
    "storms",
    "islands",
    "castles",
]


class Engine(NamedTuple):
    """How a generator engine is loaded: the settings of a server that runs it."""

    precision: Precision
    kernels: Kernels
    dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def arithmetic(self) -> str:
        """What its matrix products compute in: `fp32`, `int8` or `bf16` (the GEMM probe it is set against)."""
        return "bf16" if self.dtype == "bfloat16" else self.precision


ENGINES: dict[str, Engine] = {
    "": Engine("fp32", "torch"),
    "fast_": Engine("fp32", "auto"),
    "int8_": Engine("int8", "torch"),
    # bfloat16 is refused on a CPU without bf16 units (server/ml/device.py): there is nothing to measure there.
    **({"bf16_": Engine("fp32", "auto", "bfloat16")} if cpu_has_bf16() else {}),
}
WEIGHT_BYTES = {"fp32": 4, "int8": 1, "bf16": 2}
ENGINE_NAMES = {
    "": "transformers fp32 (generate)",
    "fast_": "fp32, our loop, kernels measured here",
    "int8_": "int8, our loop",
    "bf16_": "bfloat16, our loop, kernels measured here",
}


def prompt(tag: str, client: int, round_: int) -> str:
    """Distinct prompts of similar length, so the cache cannot help and padding stays small."""
    return f"Request {tag}-{client}-{round_}: write a few words about {TOPICS[(client + round_) % len(TOPICS)]}"


def review(index: int) -> str:
    """Distinct sentiment inputs of similar length."""
    return f"Review {index}: the {TOPICS[index % len(TOPICS)]} tour was long but the guide made it worth every minute"


def served_engine(precision: Precision, kernels: Kernels) -> str:
    """The engine prefix of a server started with these settings."""
    return "int8_" if precision == "int8" else "" if kernels == "torch" else "fast_"


def _median_s(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gemm_gflops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's sustained matrix-multiply rate in `dtype`, probed now (the arithmetic limit's yardstick)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _median_s(lambda: torch.mm(a, b), repeats) / 1e9


def memory_gbps(megabytes: int = 1024, repeats: int = 5) -> float:
    """This machine's memory read rate, probed now: a sum over a tensor larger than most caches (the yardstick of a
    lone request, whose every decoding step reads all the weights once; a CPU whose cache holds the weights can beat
    it)."""
    source = torch.ones(megabytes * 2**20 // 4)
    return source.numel() * 4 / _median_s(source.sum, repeats) / 1e9


def int8_gemm_gops(size: int = 2048, repeats: int = 5) -> float:
    """The same for int8: a dynamically quantized Linear, input quantization included, on the faster of the two
    engines an int8 model chooses between (fbgemm and oneDNN, server/ml/kernels.py)."""
    linear = nn.Linear(size, size, bias=False)
    layers = (
        list(candidates(linear, "int8", one_row=False).values())
        if int8_engines_available()
        else [quantize_linear_int8(nn.Sequential(linear))]
    )
    x = torch.randn(size, size)
    with torch.inference_mode():
        return max(2 * size**3 / _median_s(partial(layer, x), repeats) / 1e9 for layer in layers)


def flops_per_token(generator: TextGenerator) -> float:
    """Multiply-adds of one decoded token through every Linear / Conv1D weight (the LM head included), x2."""
    return 2.0 * sum(m.weight.numel() for m in generator.model.modules() if isinstance(m, nn.Linear | Conv1D))


def lone_bytes(screen: ScreenedHead | None, weights: float, new_tokens: int, arithmetic: str) -> float:
    """The weight bytes a lone request reads: every weight once per token (`weights`, a multiply-add each), but
    where `screen` makes the pick (server/ml/screen.py: every pick of a lone greedy row, the prefill's included),
    which reads the LM head's int8 copy instead."""
    per_weight = WEIGHT_BYTES[arithmetic]
    if screen is None:
        return new_tokens * weights * per_weight
    head = screen.weight.numel()
    return new_tokens * (weights * per_weight - head * (per_weight - WEIGHT_BYTES["int8"]))


class OfflineLimit:
    """Every generator engine at batch 1 and the full batch, measured in brackets between the server's levels."""

    def __init__(self, model_dir: Path, batch_size: int, new_tokens: int, repeats: tuple[int, int]):
        location = locate(str(model_dir), "generator", "local", BENCH_MODELS)
        self.models = {
            engine: TextGenerator.load(
                location,
                str(BENCH_MODELS),
                spec.precision,
                spec.kernels,
                Placement(torch.device("cpu"), DTYPES[spec.dtype]),
            )
            for engine, spec in ENGINES.items()
        }
        self.generator = self.models[""]
        self.params = GenerationParams(max_new_tokens=new_tokens)
        self.engines: dict[str, Callable[[list[list[int]]], object]] = {
            engine: partial(self._our_loop, model) if engine else partial(model.generate, params=self.params)
            for engine, model in self.models.items()
        }
        self.sizes = dict(zip((1, batch_size), repeats, strict=True))
        self.brackets: list[dict[str, list[float]]] = []
        for engine in self.engines:
            self._run(engine, 1, 0)
            self._run(engine, batch_size, 0)

    def _our_loop(self, model: TextGenerator, prompts: list[list[int]]) -> None:
        with torch.inference_mode():
            model.decoder.complete([Sequence(tuple(p), self.params) for p in prompts])

    def _run(self, engine: str, size: int, round_: int) -> float:
        """Seconds for one call on the prompts that `size` server clients send in `round_`: same token shapes."""
        prompts = [self.generator.encode(prompt(f"{SERVER_TAG}{size}", i, round_)) for i in range(size)]
        started = time.perf_counter()
        self.engines[engine](prompts)
        return time.perf_counter() - started

    def measure(self) -> None:
        """One bracket: every engine and size, `repeats` calls each."""
        first = len(self.brackets) * max(self.sizes.values())
        self.brackets.append(
            {
                f"{engine}batch_{size}": [self._run(engine, size, first + k) for k in range(repeat)]
                for engine in self.engines
                for size, repeat in self.sizes.items()
            }
        )

    def _limits(self, brackets: list[dict[str, list[float]]]) -> dict:
        """Median latency and throughput of each engine and size over `brackets`."""
        limits = {}
        for engine in self.engines:
            for size in self.sizes:
                median = statistics.median(t for bracket in brackets for t in bracket[f"{engine}batch_{size}"])
                limits[f"{engine}batch_{size}"] = {
                    "batch_size": size,
                    "latency_ms": median * 1000,
                    "requests_per_s": size / median,
                    "brackets": len(brackets),
                }
        return limits

    def latest(self) -> dict:
        """The limits of the last two brackets: those just before and just after the server level just run."""
        return self._limits(self.brackets[-2:])

    def overall(self) -> dict:
        """All brackets together: the offline rows of the table."""
        return self._limits(self.brackets)

    def engine_summary(self, new_tokens: int, batch_size: int) -> dict:
        """Each engine against transformers (same run): tokens/s, lone latency, share of its arithmetic limit
        (the fp32 or int8 GEMM probe), and how many greedy sequences of our loop equal transformers' `generate`'s, in
        batches and alone (`agreement.GreedyReference`)."""
        limits, per_token = self.overall(), flops_per_token(self.generator)
        probes = {"fp32": gemm_gflops(), "int8": int8_gemm_gops()}
        if "bf16_" in ENGINES:
            probes["bf16"] = gemm_gflops(dtype=torch.bfloat16)
        memory = memory_gbps()
        prompts = [prompt(f"{SERVER_TAG}{batch_size}", i, 0) for i in range(batch_size)]
        summary: dict = {
            "gemm_gflops": probes["fp32"],
            "int8_gemm_gops": probes["int8"],
            **({"bf16_gemm_gflops": probes["bf16"]} if "bf16" in probes else {}),
            "memory_gbps": memory,
            "gflop_per_token": per_token / 1e9,
            "compared": len(prompts),
        }
        reference = limits[f"batch_{batch_size}"], limits["batch_1"]
        greedy = GreedyReference(self.generator, prompts, new_tokens=new_tokens)
        for engine, spec in ENGINES.items():
            full, lone = limits[f"{engine}batch_{batch_size}"], limits[f"{engine}batch_1"]
            tokens_per_s = full["requests_per_s"] * new_tokens
            # Our loop's continuations against transformers' `generate`, in batches as the row's tokens/s and one
            # at a time as its lone request (where the LM head's screen picks); transformers' row is the reference.
            identical = identical_lone = len(prompts)
            if engine:
                model = self.models[engine]
                identical, identical_lone = (greedy.agreement(model, size).identical for size in (batch_size, 1))
            summary[engine or "transformers_"] = {
                "name": ENGINE_NAMES[engine],
                "precision": spec.arithmetic,
                "tokens_per_s": tokens_per_s,
                "lone_ms": lone["latency_ms"],
                "share_of_gemm_limit": tokens_per_s * per_token / (probes[spec.arithmetic] * 1e9),
                # transformers' `generate` (engine "") computes the full head; our loop may screen it.
                "lone_share_of_memory": lone_bytes(
                    self.models[engine].decoder.screen if engine else None, per_token / 2, new_tokens, spec.arithmetic
                )
                / (lone["latency_ms"] / 1e3)
                / (memory * 1e9),
                "vs_transformers_batch": full["requests_per_s"] / reference[0]["requests_per_s"],
                "vs_transformers_lone": lone["latency_ms"] / reference[1]["latency_ms"],
                "identical": identical,
                "identical_lone": identical_lone,
            }
        return summary


class ClassifierLimit:
    """The sentiment classifier called directly at the full batch: the /predict limit of each served precision (fp32
    on `kernels`, int8), and transformers' fp32 as it is, the reference for speed and labels."""

    def __init__(self, model_dir: Path, batch_size: int, kernels: Kernels, repeats: int = 5):
        location = locate(str(model_dir), "classifier", "local", BENCH_MODELS)
        load = partial(SentimentClassifier.load, location, str(BENCH_MODELS))
        self.models = {"reference": load("fp32", "torch"), "fp32": load("fp32", kernels), "int8": load("int8")}
        self.batch_size, self.repeats = batch_size, repeats
        self.texts = [review(i) for i in range(batch_size)]

    def items_per_s(self, model: str) -> float:
        return self.batch_size / _median_s(lambda: self.models[model].classify(self.texts), self.repeats)

    def summary(self, texts: int = 256) -> dict:
        """Each served precision against the reference: offline items/s and equal labels over `texts` reviews."""
        reviews, reference = [review(i) for i in range(texts)], self.items_per_s("reference")
        fp32, int8 = self.models["fp32"], self.models["int8"]
        summary: dict = {
            "reference_items_per_s": reference,
            "compared": texts,
            "kernels": f"{fp32.kernels}: {fp32.kernels_reason}",
            "int8_kernels": f"{int8.kernels}: {int8.kernels_reason}",
        }
        for precision in PRECISIONS:
            agreement = label_agreement(
                self.models["reference"], self.models[precision], reviews, batch_size=self.batch_size
            )
            summary[precision] = {
                "items_per_s": (speed := self.items_per_s(precision)),
                "vs_reference": speed / reference,
                "identical_labels": agreement.identical,
            }
        return summary

"""The benchmark on a GPU (`python -m server bench --device cuda`): the same questions as on the CPU, GPU-sized.

One dtype throughout (`--dtype`, default that of `GENERATOR_DTYPE=auto` on this GPU). The reference is transformers'
`generate` on the same GPU in the same dtype; against it, our decoding loop offline (same process, same weights) at
batch 1 and `--gpu-batch`, and the server (`python -m server serve`, DEVICE set) at each concurrency of
`--gpu-concurrency`, for each `--gpu-new-tokens`. Greedy agreement is the share of the batch's prompts on which our
loop's tokens equal `generate`'s. Offline and server phases of one token count follow each other in one run, so their
ratios are taken on the same machine state.
"""

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch

from server.bench.limits import BENCH_MODELS, prompt
from server.bench.load import run_load
from server.bench.scheduling import measure_first_token
from server.ml.decoding import GenerationParams
from server.ml.device import Placement, memory, resolve
from server.ml.generator import TextGenerator
from server.ml.loader import locate

OFFLINE_TAG = "g"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (the CPU bench, default) or cuda / cuda:N (this GPU "
        "bench: transformers generate, our loop offline and the server, in one dtype)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="the GPU bench's dtype (default: that of GENERATOR_DTYPE=auto on this GPU)",
    )
    parser.add_argument("--gpu-batch", type=int, default=32, help="the GPU bench's offline batch (default 32)")
    parser.add_argument(
        "--gpu-concurrency", default="1,32,256", help="the GPU bench's server client counts (default 1,32,256)"
    )
    parser.add_argument("--gpu-new-tokens", default="16,128", help="the GPU bench's max_new_tokens (default 16,128)")
    parser.add_argument("--gpu-repeats", type=int, default=3, help="timed offline calls per shape (default 3)")


def _synchronized_s(call: Callable[[], object], device: torch.device) -> float:
    """Seconds of `call`, the GPU's queued work included (a kernel launch returns before the kernel ends)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    started = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - started


class GpuOffline:
    """transformers' `generate` and our loop on one model, called directly: latency, tokens/s, greedy agreement."""

    def __init__(self, model: TextGenerator, repeats: int):
        self.model, self.repeats = model, repeats

    def prompts(self, size: int, new_tokens: int) -> list[list[int]]:
        return [self.model.encode(prompt(f"{OFFLINE_TAG}{new_tokens}", i, 0)) for i in range(size)]

    def _generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        return [out.token_ids for out in self.model.generate(prompts, params)]

    def _ours(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        return [out.token_ids for out in self.model.complete(prompts, params)]

    def measure(self, size: int, new_tokens: int) -> dict:
        params = GenerationParams(max_new_tokens=new_tokens)
        prompts = self.prompts(size, new_tokens)
        engines = {"transformers_generate": self._generate, "our_loop": self._ours}
        row: dict = {"batch": size, "new_tokens": new_tokens}
        outputs = {}
        for name, engine in engines.items():
            outputs[name] = engine(prompts, params)
            tokens = sum(map(len, outputs[name]))
            times = [_synchronized_s(partial(engine, prompts, params), self.model.device) for _ in range(self.repeats)]
            median = statistics.median(times)
            row[name] = {"latency_ms": median * 1000, "tokens_per_s": tokens / median, "tokens": tokens}
        same = sum(a == b for a, b in zip(outputs["transformers_generate"], outputs["our_loop"], strict=True))
        row["greedy_identical"] = f"{same}/{size}"
        row["greedy_identical_share"] = same / size
        row["our_loop_vs_generate_tokens_per_s"] = (
            row["our_loop"]["tokens_per_s"] / row["transformers_generate"]["tokens_per_s"]
        )
        row["our_loop_vs_generate_latency"] = row["our_loop"]["latency_ms"] / row["transformers_generate"]["latency_ms"]
        return row


def measure_server(url: str, concurrency: int, rounds: int, new_tokens: int) -> dict:
    def body(client: int, round_: int) -> dict:
        return {"prompts": [prompt(f"c{concurrency}t{new_tokens}", client, round_)], "max_new_tokens": new_tokens}

    asyncio.run(run_load(url, min(concurrency, 8), 1, lambda client, round_: body(client + 10_000, round_)))
    result = asyncio.run(run_load(url, concurrency, rounds, body))
    return {
        "concurrency": concurrency,
        "new_tokens": new_tokens,
        "requests": result.requests,
        "failures": result.failures,
        "requests_per_s": result.requests_per_s,
        "tokens_per_s": result.tokens_per_s,
        "p50_ms": result.percentile_ms(50),
        "p95_ms": result.percentile_ms(95),
    }


def targets(offline: list[dict], server: list[dict], batch: int) -> dict:
    """The issue's ratios, each from this run: our loop vs generate at the full batch (tokens/s) and alone (latency),
    the server at c=`batch` vs our loop offline at that batch, and greedy agreement over every offline shape."""
    result: dict = {}
    for tokens in sorted({row["new_tokens"] for row in offline}):
        by_batch = {row["batch"]: row for row in offline if row["new_tokens"] == tokens}
        served = {row["concurrency"]: row for row in server if row["new_tokens"] == tokens}
        entry = {}
        if batch in by_batch:
            entry["our_loop_vs_generate_tokens_per_s_batch"] = by_batch[batch]["our_loop_vs_generate_tokens_per_s"]
        if 1 in by_batch:
            entry["our_loop_vs_generate_latency_batch_1"] = by_batch[1]["our_loop_vs_generate_latency"]
        if batch in by_batch and batch in served:
            entry["server_vs_our_loop_offline"] = (
                served[batch]["tokens_per_s"] / by_batch[batch]["our_loop"]["tokens_per_s"]
            )
        result[f"new_tokens_{tokens}"] = entry
    same = sum(int(row["greedy_identical"].split("/")[0]) for row in offline)
    result["greedy_identical"] = f"{same}/{sum(row['batch'] for row in offline)}"
    return result


def run(args: argparse.Namespace, generator_dir: Path, classifier_dir: Path, serve) -> dict:
    """`serve(name, **env)` starts the real server (run.py's helper), as the CPU bench does."""
    placement: Placement = resolve("GENERATOR", args.device, args.dtype, "fp32", "auto")
    location = locate(str(generator_dir), "generator", "local", BENCH_MODELS)
    model = TextGenerator.load(location, str(BENCH_MODELS), "fp32", "torch", placement)
    offline_bench = GpuOffline(model, args.gpu_repeats)
    token_counts = [int(t) for t in args.gpu_new_tokens.split(",")]
    levels = [int(c) for c in args.gpu_concurrency.split(",")]
    offline, server, streaming = [], [], {}
    print(f"GPU bench on {memory(placement.device)['name']} in {placement.dtype_name}", file=sys.stderr)
    for tokens in token_counts:
        for size in sorted({1, args.gpu_batch}):
            offline.append(offline_bench.measure(size, tokens))
            print(f"offline batch {size}, {tokens} tokens: {offline[-1]}", file=sys.stderr)
    env = {
        "DEVICE": args.device,
        "GENERATOR_DTYPE": args.dtype,
        "SENTIMENT_DTYPE": args.dtype,
        "SCHEDULER_MAX_SIZE": str(max(levels + [args.gpu_batch])),
    }
    with serve("gpu", **env) as (url, _):
        for tokens in token_counts:
            for concurrency in levels:
                server.append(measure_server(url, concurrency, args.rounds, tokens))
                print(f"server c={concurrency}, {tokens} tokens: {server[-1]}", file=sys.stderr)
        streaming = measure_first_token(url, model, args.stream_rounds, min(token_counts))
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**memory(placement.device), "torch": torch.__version__, "cuda": torch.version.cuda},
        "device": str(placement.device),
        "dtype": placement.dtype_name,
        "model": str(generator_dir),
        "offline": offline,
        "server": server,
        "streaming": streaming,
        "targets": targets(offline, server, args.gpu_batch),
    }


def table(results: dict) -> str:
    lines = [
        f"GPU bench, {results['machine']['name']}, {results['dtype']}, {results['when']}",
        "offline | batch | new tokens | generate tok/s | our loop tok/s | ratio | generate ms | our ms | greedy",
        "---|---|---|---|---|---|---|---|---",
    ]
    for row in results["offline"]:
        ref, ours = row["transformers_generate"], row["our_loop"]
        lines.append(
            f"| {row['batch']} | {row['new_tokens']} | {ref['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f}"
            f" | {row['our_loop_vs_generate_tokens_per_s']:.2f}x | {ref['latency_ms']:.1f} | "
            f"{ours['latency_ms']:.1f} | {row['greedy_identical']}"
        )
    lines += [
        "server | clients | new tokens | tok/s | req/s | p50 ms | p95 ms | failures",
        "---|---|---|---|---|---|---|---",
    ]
    for row in results["server"]:
        lines.append(
            f"| {row['concurrency']} | {row['new_tokens']} | {row['tokens_per_s']:.0f} | "
            f"{row['requests_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['failures']}"
        )
    if results["streaming"]:
        lines.append(
            f"first token p50 {results['streaming']['ttft_p50_ms']:.1f} ms "
            f"(prefill alone {results['streaming']['prefill_p50_ms']:.1f} ms)"
        )
    lines.append(f"targets: {results['targets']}")
    return "\n".join(lines)

"""Orchestrates the benchmark phases; see docs/performance.md.

Phases: the real server (`python -m server serve`, as users start it) at each concurrency, each level
bracketed by offline limits (the model called directly in this process, batch 1 and batch SCHEDULER_MAX_SIZE,
while the server idles) -> interactive latency while a background (batch offload, `local`) job runs, against
the same server idle -> a mixed-length workload, time to first token, cancelled streams -> the mixed workload
on a server with GENERATOR_SCHEDULER=static -> the cache-hit path -> the naive baseline server at each
concurrency.
Ratios are computed within the one run, each server level against the offline measurements just before
and just after it: on a shared machine the speed drifts by 10% within minutes, so a limit measured once at
the start would judge the last level against a different machine.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm import tqdm

from server.bench import against, gpu
from server.bench.limits import (
    BENCH_MODELS,
    ENGINE_NAMES,
    ENGINES,
    SERVER_TAG,
    ClassifierLimit,
    OfflineLimit,
    prompt,
    review,
    served_engine,
)
from server.bench.load import LoadResult, run_load
from server.bench.scheduling import (
    CANCELLED_TOKENS,
    LONG_EVERY,
    compare_mixed,
    measure_cancellation,
    measure_first_token,
    measure_mixed,
)
from server.core.config import PROJECT_ROOT, get_settings
from server.ml.allocator import keep_freed_memory
from server.ml.device import CPU_BATCH_MAX_SIZE, CPU_FLOAT32, kernels_for
from server.ml.kernels import cpu_model_and_flags
from server.ml.offline import DISTILBERT_BASE, GPT2_124M, build_classifier, build_generator, standin_marker_exists


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="generator to benchmark (default: a GPT-2-124M-architecture "
        "model with random weights, built under models_cache/bench/ on first use)",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=12, help="requests per client at each concurrency (default 12)")
    parser.add_argument("--baseline-rounds", type=int, default=2, help="the same for the naive baseline (default 2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens per request (default 16)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=get_settings().scheduler_max_size or CPU_BATCH_MAX_SIZE,
        help="offline batch size and the server's SCHEDULER_MAX_SIZE (default: the setting, else 32)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline server")
    parser.add_argument(
        "--cache-requests", type=int, default=2000, help="requests for the cache-hit phase (default 2000)"
    )
    parser.add_argument(
        "--redis-url",
        help="Redis for the cache-hit phase (default: a redis-server the bench "
        "starts when one is installed, else the in-memory cache)",
    )
    parser.add_argument(
        "--background-items",
        type=int,
        default=128,
        help="items of the background local job in the batch-offload phase (default 128)",
    )
    parser.add_argument(
        "--mixed-rounds", type=int, default=4, help="requests per client in the mixed-length phase (default 4)"
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=128,
        help="max_new_tokens of the long requests (one in eight) in the mixed phase (default 128)",
    )
    parser.add_argument(
        "--stream-rounds", type=int, default=12, help="streamed requests for the time-to-first-token phase (default 12)"
    )
    parser.add_argument(
        "--predict-rounds",
        type=int,
        default=16,
        help="/predict requests per client in the sentiment phase, in each precision (default 16)",
    )
    parser.add_argument(
        "--against",
        help="comma-separated base URLs of other OpenAI-compatible servers (vLLM, llama.cpp, TGI, another build of "
        "ours): instead of the phases above, compare them with ours through /v1/completions, interleaved "
        "(lone request, the largest --concurrency, the mixed workload)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats of each workload with --against (default 3)"
    )
    parser.add_argument(
        "--ours",
        type=our_precisions,
        default="fp32",
        help="with --against: the precisions our server runs in, one server each, compared in the same run "
        "(comma-separated among fp32, int8, bf16 (on a CPU with bf16 units); default fp32; the first is what the "
        "others are given against)",
    )
    parser.add_argument("--output", type=Path, help="JSON results (default: bench-results/bench-<time>.json)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, few requests: checks the harness in well under a minute (numbers meaningless)",
    )
    gpu.add_arguments(parser)


def ensure_models(args: argparse.Namespace) -> tuple[Path, Path]:
    classifier = BENCH_MODELS / ("tiny-classifier" if args.quick else "distilbert-base-random")
    if not standin_marker_exists(classifier):
        build_classifier(classifier, architecture=None if args.quick else DISTILBERT_BASE)
    if args.model_dir:
        return args.model_dir, classifier
    generator = BENCH_MODELS / ("tiny-gpt2" if args.quick else "gpt2-124m-random")
    if not standin_marker_exists(generator):
        build_generator(generator, architecture=None if args.quick else GPT2_124M)
    return generator, classifier


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(command: list[str], env: dict[str, str], port: int, log_path: Path):
    """Start a server, wait for /health, yield (base URL, process), and stop it afterwards."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise TimeoutError(f"server not healthy after 300 s; see {log_path}")
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            process.wait(30)


def server_factory(work: Path, env: dict[str, str]):
    """`serve(name, **overrides)`: a context manager starting `python -m server serve` with `env` and its own
    database and log under `work`, yielding (base URL, process)."""

    def serve(name: str, **overrides: str):
        port = free_port()
        return server_process(
            [sys.executable, "-m", "server", "serve", "--port", str(port)],
            {**env, "DATABASE_URL": f"sqlite+aiosqlite:///{work / f'{name}.db'}", **overrides},
            port,
            work / f"{name}-server.log",
        )

    return serve


def batch_stats(base_url: str) -> tuple[float, float]:
    """(sum, count) of the generator's batch-size histogram."""
    values = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        for kind in values:
            if line.startswith(f"model_batch_size_{kind}") and 'model="generator"' in line:
                values[kind] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def drive(
    base_url: str,
    tag: str,
    levels: list[int],
    rounds: int,
    new_tokens: int,
    bar: tqdm,
    offline: OfflineLimit | None = None,
    engine: str = "fast_",
) -> list[dict]:
    """Closed-loop load at each level; with `offline`, each level is bracketed by offline measurements, and the
    rows say which offline `engine` the server runs (its own limit)."""
    rows = []
    if offline:
        offline.measure()
    for concurrency in levels:

        def body(client: int, round_: int, c: int = concurrency) -> dict:
            return {"prompts": [prompt(f"{tag}{c}", client, round_)], "max_new_tokens": new_tokens}

        def warmup(client: int, round_: int, body: Callable[[int, int], dict] = body) -> dict:
            return body(client + 1000, round_)

        asyncio.run(run_load(base_url, 1, 2, warmup))
        before = batch_stats(base_url) if offline else None
        result: LoadResult = asyncio.run(run_load(base_url, concurrency, rounds, body))
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "requests": result.requests,
            "failures": result.failures,
            "requests_per_s": result.requests_per_s,
            "p50_ms": result.percentile_ms(50),
            "p95_ms": result.percentile_ms(95),
            "p99_ms": result.percentile_ms(99),
        }
        if offline and before is not None:
            after = batch_stats(base_url)
            row["tokens_per_s"] = result.tokens_per_s
            row["mean_batch_size"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            offline.measure()
            row["engine"], row["offline"] = engine, offline.latest()
        rows.append(row)
        bar.update(1)
    return rows


@contextmanager
def redis_for_bench(url: str | None, work: Path):
    """The Redis to use: the given URL, a private redis-server, or None (in-memory cache) without one."""
    binary = shutil.which("redis-server")
    if url or binary is None:
        yield url
        return
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def measure_cache_hits(base_url: str, requests: int, concurrency: int) -> dict:
    """A hit through HTTP: p50 one at a time, and hit throughput vs a trivial endpoint (GET /) at `concurrency`."""
    body = {"prompts": ["A prompt everyone asks about"], "max_new_tokens": 16}
    assert httpx.post(f"{base_url}/generate", json=body, timeout=600).status_code == 200
    sequential = asyncio.run(run_load(base_url, 1, max(requests // 4, 10), lambda c, r: body))
    hits = asyncio.run(run_load(base_url, concurrency, max(requests // concurrency, 1), lambda c, r: body))
    trivial = asyncio.run(run_load(base_url, concurrency, max(requests // concurrency, 1), None, path="/"))
    return {
        "hit_p50_ms": sequential.percentile_ms(50),
        "hit_p99_ms": sequential.percentile_ms(99),
        "concurrency": concurrency,
        "hits_per_s": hits.requests_per_s,
        "trivial_endpoint_per_s": trivial.requests_per_s,
        "hits_vs_trivial_endpoint": hits.requests_per_s / trivial.requests_per_s,
        "failures": sequential.failures + hits.failures + trivial.failures,
    }


def measure_background(base_url: str, items: int, rounds: int, new_tokens: int) -> dict:
    """Interactive c=1 latency idle, then while a background local job of `items` items runs; the job's items/s."""

    def body(client: int, round_: int) -> dict:
        return {"prompts": [prompt("i", client, round_)], "max_new_tokens": new_tokens}

    idle = asyncio.run(run_load(base_url, 1, rounds, body))
    requests = [
        {"custom_id": f"bg-{i}", "body": {"prompt": prompt("bg", i, 0), "max_tokens": new_tokens}} for i in range(items)
    ]
    model = httpx.get(f"{base_url}/v1/models", timeout=60).json()["data"][0]["id"]
    created = httpx.post(
        f"{base_url}/batch/jobs",
        timeout=60,
        json={
            "name": "bench background",
            "provider": "local",
            "model": model,
            "kind": "generate",
            "schedule": "now",
            "requests": requests,
        },
    )
    if created.status_code != 201:
        raise RuntimeError(f"the background job was refused: {created.status_code} {created.text}")
    job = created.json()
    started = time.perf_counter()
    while httpx.get(f"{base_url}/batch/jobs/{job['id']}", timeout=60).json()["counts"]["succeeded"] == 0:
        time.sleep(0.05)
    busy = asyncio.run(run_load(base_url, 1, rounds, lambda c, r: body(c + 100, r)))
    still_running = httpx.get(f"{base_url}/batch/jobs/{job['id']}", timeout=60).json()["status"] != "completed"
    while (state := httpx.get(f"{base_url}/batch/jobs/{job['id']}", timeout=60).json())["status"] != "completed":
        if state["status"] in ("failed", "partially_completed", "cancelled", "expired"):
            raise RuntimeError(f"background job ended {state['status']}")
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    return {
        "items": items,
        "background_items_per_s": items / elapsed,
        "interactive_rounds": rounds,
        "idle_p50_ms": idle.percentile_ms(50),
        "busy_p50_ms": busy.percentile_ms(50),
        "busy_p95_ms": busy.percentile_ms(95),
        "busy_vs_idle_p50": busy.percentile_ms(50) / idle.percentile_ms(50),
        "job_outlived_interactive_load": still_running,
        "failures": idle.failures + busy.failures,
    }


def measure_predict(base_url: str, classifier: ClassifierLimit, precision: str, concurrency: int, rounds: int) -> dict:
    """/predict with `concurrency` clients, one distinct text per request, against the classifier called directly at
    the full batch in the same precision, just before and just after."""
    asyncio.run(
        run_load(base_url, 2, 2, lambda client, round_: {"text": review(90_000 + 2 * client + round_)}, path="/predict")
    )
    before = classifier.items_per_s(precision)
    result = asyncio.run(
        run_load(
            base_url,
            concurrency,
            rounds,
            path="/predict",
            body_for=lambda client, round_: {"text": review(client * rounds + round_)},
        )
    )
    limit = statistics.median([before, classifier.items_per_s(precision)])
    return {
        "precision": precision,
        "concurrency": concurrency,
        "requests": result.requests,
        "failures": result.failures,
        "items_per_s": result.requests_per_s,
        "p50_ms": result.percentile_ms(50),
        "offline_items_per_s": limit,
        "vs_offline": result.requests_per_s / limit,
    }


def machine() -> dict:
    """The CPU (model and the ISA extensions the kernels care about), as /proc/cpuinfo names them, and torch's."""
    cpu, isa = cpu_model_and_flags()
    return {
        "cpu": cpu,
        "isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # Idempotent: what the bench process runs its engines with (set at the start of `run`).
        "allocator": keep_freed_memory(),
    }


def describe(machine: dict) -> str:
    return (
        f"CPU {machine['cpu']} ({', '.join(machine['isa']) or 'no AVX'}; torch kernels "
        f"{machine['torch_cpu_capability']}), {machine['cpus']} CPUs, torch {machine['torch']}"
    )


def quicken(args: argparse.Namespace) -> None:
    """--quick: a tiny model and few requests, to check the harness (numbers meaningless)."""
    args.concurrency, args.rounds, args.baseline_rounds, args.new_tokens = "1,4", 2, 1, 4
    args.cache_requests, args.background_items = 100, 16
    args.mixed_rounds, args.long_tokens, args.stream_rounds, args.predict_rounds = 2, 12, 3, 2
    args.repeats = min(args.repeats, 2)


def server_env(generator_dir: Path, classifier_dir: Path, **overrides: str) -> dict[str, str]:
    """What every server the bench starts runs with: the bench's models, fp32, no keys, no ingress limit."""
    return {
        "GENERATOR_MODEL": str(generator_dir),
        "SENTIMENT_MODEL": str(classifier_dir),
        "MODEL_SOURCE": "local",
        "LOG_LEVEL": "warning",
        "INGRESS_RATE_LIMIT": "off",
        "API_KEYS": "",
        "GENERATOR_PRECISION": "fp32",
        "SENTIMENT_PRECISION": "fp32",
        **overrides,
    }


# The settings a server of ours runs with in each arithmetic `--ours` names (bf16 on a CPU with bf16 units only).
OURS: dict[str, dict[str, str]] = {
    "fp32": {},
    "int8": {"GENERATOR_PRECISION": "int8", "SENTIMENT_PRECISION": "int8"},
    "bf16": {"GENERATOR_DTYPE": "bfloat16", "SENTIMENT_DTYPE": "bfloat16"},
}


def our_precisions(given: str) -> list[str]:
    """`--ours`: distinct arithmetics, in order (argparse turns the error into a one-line usage error)."""
    precisions = list(dict.fromkeys(p.strip() for p in given.split(",") if p.strip()))
    if not precisions or any(p not in OURS for p in precisions):
        raise argparse.ArgumentTypeError(f"{given!r}: expected one or more of {', '.join(OURS)}, comma-separated")
    return precisions


def run_against(args: argparse.Namespace) -> dict:
    """Our server, started here as for the other phases, beside the servers of --against (server/bench/against.py)."""
    if args.quick:
        quicken(args)
    concurrency = max(int(c) for c in args.concurrency.split(","))
    generator_dir, classifier_dir = ensure_models(args)
    settings = get_settings()
    env = server_env(
        generator_dir,
        classifier_dir,
        SCHEDULER_MAX_SIZE=str(args.batch_size),
        SCHEDULER_QUEUE_LIMIT=str(max(1024, 4 * concurrency)),
        GENERATOR_FP32_KERNELS=settings.generator_fp32_kernels,
        SENTIMENT_FP32_KERNELS=settings.sentiment_fp32_kernels,
        DEVICE="cpu",
    )
    plan = against.workloads(concurrency, args.rounds, args.mixed_rounds, args.long_tokens)
    # The others first: one that cannot serve stops the run before ours is even started.
    others = [
        asyncio.run(against.discover(address, address))
        for address in (against.base_url(url) for url in args.against.split(",") if url.strip())
    ]
    serve = server_factory(Path(tempfile.mkdtemp(prefix="bench-against-")), env)
    with ExitStack() as servers:
        ours: list[against.Target] = []
        for precision in args.ours:
            name = against.OURS if not ours else f"{against.OURS} {precision}"
            url, _ = servers.enter_context(serve(name.replace(" ", "-"), **OURS[precision]))
            ours.append(asyncio.run(against.discover(name, url)))
        targets = [*ours, *others]
        with tqdm(total=args.repeats * len(plan) * len(targets), desc="against", file=sys.stderr) as bar:
            compared = against.compare(targets, plan, args.repeats, args.new_tokens, bar)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": str(generator_dir),
        "quick": args.quick,
        "against": compared,
    }


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        quicken(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    int8_levels = sorted({1, max(levels)})
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    half_servers = [engine for engine in ("int8_", "bf16_") if engine in ENGINES]
    phases = 5 + len(levels) * (1 if args.no_baseline else 2) + len(int8_levels) * len(half_servers)
    settings = get_settings()
    with tqdm(total=phases, desc="bench", unit="phase", file=sys.stderr) as bar:
        generator_dir, classifier_dir = ensure_models(args)
        # The engines measured here, transformers' included, run with the allocator the server sets for itself
        # (and `machine()` reports it).
        keep_freed_memory()
        bar.set_postfix_str("offline limits")
        offline = OfflineLimit(generator_dir, args.batch_size, args.new_tokens, (3, 1) if args.quick else (4, 2))
        classifier = ClassifierLimit(
            classifier_dir, args.batch_size, kernels_for(settings.sentiment_fp32_kernels, CPU_FLOAT32)
        )
        bar.update(1)
        env = server_env(
            generator_dir,
            classifier_dir,
            SCHEDULER_MAX_SIZE=str(args.batch_size),
            SCHEDULER_QUEUE_LIMIT=str(max(1024, 4 * max(levels))),
            GENERATOR_FP32_KERNELS=settings.generator_fp32_kernels,
            SENTIMENT_FP32_KERNELS=settings.sentiment_fp32_kernels,
            DEVICE="cpu",
        )

        serve = server_factory(work, env)
        bar.set_postfix_str("server")
        engine = served_engine("fp32", kernels_for(settings.generator_fp32_kernels, CPU_FLOAT32))
        with serve("server") as (url, _):
            server_rows = drive(url, SERVER_TAG, levels, args.rounds, args.new_tokens, bar, offline, engine)
            predict = {"fp32": measure_predict(url, classifier, "fp32", max(levels), args.predict_rounds)}
            bar.set_postfix_str("background job")
            background = measure_background(url, args.background_items, max(args.rounds, 8), args.new_tokens)
            bar.update(1)
            bar.set_postfix_str("mixed lengths, streaming")
            mixed = measure_mixed(url, "c", max(levels), args.mixed_rounds, args.new_tokens, args.long_tokens)
            streaming = {
                **measure_first_token(url, offline.models[engine], args.stream_rounds, args.new_tokens),
                "cancellation": measure_cancellation(url, 4, CANCELLED_TOKENS),
            }
            bar.update(1)
        bar.set_postfix_str("int8 server")
        with serve("int8", GENERATOR_PRECISION="int8", SENTIMENT_PRECISION="int8") as (url, _):
            server_rows += drive(url, SERVER_TAG, int8_levels, args.rounds, args.new_tokens, bar, offline, "int8_")
            predict["int8"] = measure_predict(url, classifier, "int8", max(levels), args.predict_rounds)
        if "bf16_" in ENGINES:
            bar.set_postfix_str("bf16 server")
            with serve("bf16", **OURS["bf16"]) as (url, _):
                server_rows += drive(url, SERVER_TAG, int8_levels, args.rounds, args.new_tokens, bar, offline, "bf16_")
        bar.set_postfix_str("static scheduler")
        with serve("static", GENERATOR_SCHEDULER="static") as (url, _):
            mixed = compare_mixed(
                mixed, measure_mixed(url, "s", max(levels), args.mixed_rounds, args.new_tokens, args.long_tokens)
            )
        bar.update(1)
        bar.set_postfix_str("cache hits")
        with (
            redis_for_bench(args.redis_url, work) as redis_url,
            serve("cache", **({"REDIS_URL": redis_url} if redis_url else {})) as (url, _),
        ):
            cache = {
                "backend": "redis" if redis_url else "memory",
                **measure_cache_hits(url, args.cache_requests, max(levels)),
            }
        bar.update(1)
        baseline_rows = []
        if not args.no_baseline:
            bar.set_postfix_str("baseline")
            port = free_port()
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "server.bench.baseline:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
            with server_process(command, {"BENCH_MODEL": str(generator_dir)}, port, work / "baseline.log") as (url, _):
                baseline_rows = drive(url, "b", levels, args.baseline_rounds, args.new_tokens, bar)
    return summarize(
        args,
        generator_dir,
        offline,
        server_rows,
        baseline_rows,
        cache,
        background,
        mixed,
        streaming,
        predict,
        classifier.summary(),
    )


def summarize(
    args,
    generator_dir: Path,
    offline: OfflineLimit,
    server_rows: list[dict],
    baseline_rows: list[dict],
    cache: dict,
    background: dict,
    mixed: dict,
    streaming: dict,
    predict: dict,
    classifier: dict,
) -> dict:
    baseline_by_c = {row["concurrency"]: row for row in baseline_rows}
    full = f"batch_{args.batch_size}"
    for row in server_rows:
        limits, engine = row["offline"], row["engine"]
        row["vs_offline_full_batch_throughput"] = row["requests_per_s"] / limits[full]["requests_per_s"]
        row["p50_vs_offline_batch_1_latency"] = row["p50_ms"] / limits["batch_1"]["latency_ms"]
        row["vs_own_full_batch_throughput"] = row["requests_per_s"] / limits[f"{engine}{full}"]["requests_per_s"]
        row["p50_vs_own_batch_1_latency"] = row["p50_ms"] / limits[f"{engine}batch_1"]["latency_ms"]
        if row["concurrency"] in baseline_by_c:
            row["vs_baseline_throughput"] = row["requests_per_s"] / baseline_by_c[row["concurrency"]]["requests_per_s"]
    limits = offline.overall()
    background["vs_offline_full_batch_throughput"] = (
        background["background_items_per_s"] / limits[f"{server_rows[0]['engine']}{full}"]["requests_per_s"]
    )
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "kernels": f"{offline.models['fast_'].kernels}: {offline.models['fast_'].kernels_reason}",
        "int8_kernels": f"{offline.models['int8_'].kernels}: {offline.models['int8_'].kernels_reason}",
        **(
            {"bf16_kernels": f"{offline.models['bf16_'].kernels}: {offline.models['bf16_'].kernels_reason}"}
            if "bf16_" in offline.models
            else {}
        ),
        "memory_pages": offline.models["fast_"].memory_pages,
        "head_screen": offline.models["fast_"].head_screen,
        "model": str(generator_dir),
        "new_tokens": args.new_tokens,
        "long_tokens": args.long_tokens,
        "quick": args.quick,
        "offline": offline.overall(),
        "server": server_rows,
        "baseline": baseline_rows,
        "cache": cache,
        "background": background,
        "mixed": mixed,
        "streaming": streaming,
        "predict": predict,
        "classifier": classifier,
        "engines": offline.engine_summary(args.new_tokens, args.batch_size),
    }


def table(results: dict) -> str:
    lines = [
        f"model {results['model']}, {results['new_tokens']} new tokens; {describe(results['machine'])}",
        f"fp32 kernels: generator {results['kernels']}; classifier {results['classifier']['kernels']}",
        f"int8 kernels: generator {results['int8_kernels']}; classifier {results['classifier']['int8_kernels']}",
        *([f"bf16 kernels: generator {results['bf16_kernels']}"] if "bf16_kernels" in results else []),
        f"memory pages (the fp32 generator's): {results['memory_pages']}",
        f"LM head screen (the fp32 generator's): {results['head_screen']}",
        "",
    ]
    full = max(int(k.rsplit("_", 1)[1]) for k in results["offline"])
    lines.append(
        f"| run | engine | concurrency | req/s | tokens/s | p50 ms | p95 ms | p99 ms | mean batch | vs "
        f"transformers batch {full} | p50 vs transformers batch 1 | vs own engine batch {full} | p50 vs own "
        "engine batch 1 | vs baseline |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for engine in ENGINES:
        for size in (1, full):
            if f"{engine}batch_{size}" not in results["offline"]:
                continue
            data = results["offline"][f"{engine}batch_{size}"]
            lines.append(
                f"| offline batch {size} | {ENGINE_NAMES[engine]} | - | {data['requests_per_s']:.2f} | - | "
                f"{data['latency_ms']:.0f} | - | - | {size} | - | - | - | - | - |"
            )
    for name, rows in (("server", results["server"]), ("baseline", results["baseline"])):
        for row in rows:

            def fmt(key: str, spec: str = ".2f", suffix: str = "", row: dict = row) -> str:
                return f"{row[key]:{spec}}{suffix}" if key in row else "-"

            engine = ENGINE_NAMES[row["engine"]] if "engine" in row else "transformers fp32 (naive server)"
            lines.append(
                f"| {name} | {engine} | {row['concurrency']} | {row['requests_per_s']:.2f} | "
                f"{fmt('tokens_per_s', '.1f')} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                f"{row['p99_ms']:.0f} | {fmt('mean_batch_size', '.1f')} | "
                f"{fmt('vs_offline_full_batch_throughput', '.2f', 'x')} | "
                f"{fmt('p50_vs_offline_batch_1_latency', '.2f', 'x')} | "
                f"{fmt('vs_own_full_batch_throughput', '.2f', 'x')} | "
                f"{fmt('p50_vs_own_batch_1_latency', '.2f', 'x')} | "
                f"{fmt('vs_baseline_throughput', '.2f', 'x')} |"
            )
    brackets = next(iter(results["offline"].values()))["brackets"]
    lines.append("")
    lines.append(
        f"offline rows: median of {brackets} measurements taken between the server levels; each server "
        "row's ratios use the ones just before and after it (server[].offline in the JSON)"
    )
    engines = results["engines"]
    lines.append("")
    lines.append(
        f"| engine (offline, {results['new_tokens']} greedy tokens) | tokens/s at batch {full} | vs "
        f"transformers | share of the GEMM probe | lone request ms | vs transformers | lone request's weight reads, "
        f"share of the {engines['memory_gbps']:.1f} GB/s memory probe | greedy output identical to transformers' "
        f"(our loop at batch {full}; alone) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    probes = {
        "fp32": f"{engines['gemm_gflops']:.0f} GFLOPS fp32",
        "int8": f"{engines['int8_gemm_gops']:.0f} GOPS int8",
        "bf16": f"{engines.get('bf16_gemm_gflops', 0):.0f} GFLOPS bf16",
    }
    for engine in ENGINES:
        if (engine or "transformers_") not in engines:
            continue
        data = engines[engine or "transformers_"]
        probe = probes[data["precision"]]
        lines.append(
            f"| {data['name']} | {data['tokens_per_s']:.0f} | {data['vs_transformers_batch']:.2f}x | "
            f"{data['share_of_gemm_limit']:.0%} of {probe} | {data['lone_ms']:.0f} | "
            f"{data['vs_transformers_lone']:.2f}x | {data['lone_share_of_memory']:.0%} | "
            f"{data['identical']}/{engines['compared']}; {data['identical_lone']}/{engines['compared']} |"
        )
    lines.append("")
    for data in results["predict"].values():
        lines.append(
            f"sentiment /predict {data['precision']} at concurrency {data['concurrency']}: "
            f"{data['items_per_s']:.1f} items/s, p50 {data['p50_ms']:.0f} ms, vs the same classifier called "
            f"directly at batch {full} {data['offline_items_per_s']:.1f} items/s: {data['vs_offline']:.2f}x"
        )
    classifier = results["classifier"]
    lines.append(
        f"sentiment classifier offline at batch {full}: transformers fp32 "
        f"{classifier['reference_items_per_s']:.1f} items/s; served fp32 "
        f"{classifier['fp32']['items_per_s']:.1f} ({classifier['fp32']['vs_reference']:.2f}x, labels equal on "
        f"{classifier['fp32']['identical_labels']}/{classifier['compared']}); int8 "
        f"{classifier['int8']['items_per_s']:.1f} ({classifier['int8']['vs_reference']:.2f}x, labels equal on "
        f"{classifier['int8']['identical_labels']}/{classifier['compared']})"
    )
    cache = results["cache"]
    failures = sum(row["failures"] for row in results["server"] + results["baseline"]) + cache["failures"]
    lines.append("")
    lines.append(
        f"cache hits ({cache['backend']}): p50 {cache['hit_p50_ms']:.2f} ms, p99 {cache['hit_p99_ms']:.2f} ms "
        f"one at a time; {cache['hits_per_s']:.0f} hits/s at concurrency {cache['concurrency']} = "
        f"{cache['hits_vs_trivial_endpoint']:.2f}x a trivial endpoint (GET /, "
        f"{cache['trivial_endpoint_per_s']:.0f}/s) on the same server"
    )
    background = results["background"]
    lines.append(
        f"background local job ({background['items']} items, BATCH_BACKGROUND_MAX_SIZE batches): interactive "
        f"c=1 p50 {background['busy_p50_ms']:.0f} ms while it runs vs {background['idle_p50_ms']:.0f} ms idle "
        f"({background['busy_vs_idle_p50']:.2f}x, p95 {background['busy_p95_ms']:.0f} ms); background "
        f"{background['background_items_per_s']:.2f} items/s = "
        f"{background['vs_offline_full_batch_throughput']:.2f}x the offline full-batch limit"
    )
    failures += background["failures"]
    mixed = results["mixed"]
    continuous, static = mixed["continuous"], mixed["static"]
    lines.append(
        f"mixed lengths ({continuous['clients']} clients, one request in {LONG_EVERY} asks "
        f"{results['long_tokens']} tokens, the others {results['new_tokens']}): continuous "
        f"{continuous['requests_per_s']:.2f} req/s vs static {static['requests_per_s']:.2f} "
        f"({mixed['throughput_vs_static']:.2f}x); short requests p50 {continuous['short_p50_ms']:.0f} ms vs "
        f"{static['short_p50_ms']:.0f} ms ({mixed['short_p50_vs_static']:.2f}x)"
    )
    failures += continuous["failures"] + static["failures"] + sum(p["failures"] for p in results["predict"].values())
    streaming = results["streaming"]
    cancelled = streaming["cancellation"]
    lines.append(
        f"streaming c=1: first token p50 {streaming['ttft_p50_ms']:.0f} ms vs the prompt's prefill alone "
        f"{streaming['prefill_p50_ms']:.0f} ms ({streaming['ttft_vs_prefill']:.2f}x); {cancelled['requests']}"
        f" streams closed mid-generation: {cancelled['freed_within_one_step']:.0f} of "
        f"{cancelled['freed']:.0f} rows freed within one step (mean {cancelled['mean_steps']:.2f} steps)"
    )
    lines.append(f"failed requests: {failures}")
    return "\n".join(lines)


def run_gpu(args: argparse.Namespace) -> dict:
    """The GPU bench (server/bench/gpu.py) with this bench's models and server harness."""
    generator_dir, classifier_dir = ensure_models(args)
    env = server_env(
        generator_dir,
        classifier_dir,
        SCHEDULER_QUEUE_LIMIT="4096",
        GENERATOR_FP32_KERNELS="auto",
        SENTIMENT_FP32_KERNELS="auto",
    )
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    return gpu.run(args, generator_dir, classifier_dir, server_factory(work, env))


def main(args: argparse.Namespace) -> dict:
    on_gpu = args.device != "cpu"
    results = run_gpu(args) if on_gpu else run_against(args) if args.against else run(args)
    output = args.output or PROJECT_ROOT / "bench-results" / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    if on_gpu:
        print(gpu.table(results))
    elif args.against:
        print(f"model {results['model']}; {describe(results['machine'])}\n\n{against.table(results['against'])}")
    else:
        print(table(results))
    print(f"\nresults: {output}")
    return results

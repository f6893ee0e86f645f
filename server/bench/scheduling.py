"""Benchmark phases for continuous batching and streaming (docs/performance.md): a mixed-length workload
against the static scheduler, time to first token against the prefill alone, and how fast a cancelled
stream frees its row (read from the decoding loop's own `scheduler_abort_steps` histogram)."""

import asyncio
import statistics
import time

import aiohttp
import httpx
import torch

from server.bench.load import run_load
from server.ml.decoding import GenerationParams, Sequence
from server.ml.generator import TextGenerator

LONG_EVERY = 8
# Streams that will be closed early ask for the most tokens a request may, so they cannot finish first.
CANCELLED_TOKENS = 256


def mixed_body(tag: str, short: int, long: int):
    """One request in LONG_EVERY asks `long` new tokens, the others `short` (which one rotates with the round)."""

    def is_long(client: int, round_: int) -> bool:
        return (client + round_) % LONG_EVERY == 0

    def body(client: int, round_: int) -> dict:
        return {
            "prompts": [f"Mixed {tag}-{client}-{round_}: tell a story about the sea"],
            "max_new_tokens": long if is_long(client, round_) else short,
        }

    return body, lambda client, round_: "long" if is_long(client, round_) else "short"


def measure_mixed(base_url: str, tag: str, clients: int, rounds: int, short: int, long: int) -> dict:
    body, label = mixed_body(tag, short, long)
    asyncio.run(run_load(base_url, 1, 1, lambda c, r: body(c + 1000, r)))
    result = asyncio.run(run_load(base_url, clients, rounds, body, label_of=label))
    return {
        "clients": clients,
        "requests": result.requests,
        "failures": result.failures,
        "requests_per_s": result.requests_per_s,
        "tokens_per_s": result.tokens_per_s,
        "short_p50_ms": result.percentile_ms(50, "short"),
        "short_p95_ms": result.percentile_ms(95, "short"),
        "long_p50_ms": result.percentile_ms(50, "long"),
    }


def compare_mixed(continuous: dict, static: dict) -> dict:
    return {
        "continuous": continuous,
        "static": static,
        "throughput_vs_static": continuous["requests_per_s"] / static["requests_per_s"],
        "short_p50_vs_static": continuous["short_p50_ms"] / static["short_p50_ms"],
    }


async def _first_token_s(base_url: str, prompts: list[str], new_tokens: int) -> list[float]:
    waits = []
    async with aiohttp.ClientSession(base_url) as session:
        for text in prompts:
            started = time.perf_counter()
            body = {"prompts": [text], "max_new_tokens": new_tokens, "stream": True}
            async with session.post("/generate", json=body, headers={"Cache-Control": "no-cache"}) as response:
                async for line in response.content:
                    if line.startswith(b"data: "):
                        waits.append(time.perf_counter() - started)
                        break
                await response.read()
    return waits


def prefill_s(generator: TextGenerator, prompts: list[str], new_tokens: int) -> list[float]:
    """The prefill step alone, in this process, for each prompt (what the first token cannot beat)."""
    times = []
    with torch.inference_mode():
        for text in prompts:
            sequence = Sequence(tuple(generator.encode(text)), GenerationParams(new_tokens))
            started = time.perf_counter()
            generator.decoder.prefill([sequence])
            times.append(time.perf_counter() - started)
    return times


def measure_first_token(base_url: str, generator: TextGenerator, rounds: int, new_tokens: int) -> dict:
    """Streaming at c=1: median time to the first token over HTTP vs the median prefill of the same prompts,
    interleaved (prefills, streams, prefills) so that drift hits both alike."""
    prompts = [f"Streaming prompt {i}: describe a quiet harbour at dawn" for i in range(rounds)]
    prefill_s(generator, prompts[:2], new_tokens)
    before = prefill_s(generator, prompts, new_tokens)
    ttft = asyncio.run(_first_token_s(base_url, prompts, new_tokens))
    after = prefill_s(generator, prompts, new_tokens)
    prefill = statistics.median(before + after)
    return {
        "rounds": rounds,
        "ttft_p50_ms": statistics.median(ttft) * 1000,
        "prefill_p50_ms": prefill * 1000,
        "ttft_vs_prefill": statistics.median(ttft) / prefill,
    }


def _abort_steps(base_url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=60).text.splitlines():
        if line.startswith("scheduler_abort_steps") and 'model="generator"' in line:
            name = line.split("{")[0] + (line.split('le="')[1].split('"')[0] if 'le="' in line else "")
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


async def _cancel_mid_stream(base_url: str, index: int, chunks: int, new_tokens: int) -> None:
    async with aiohttp.ClientSession(base_url) as session:
        body = {
            "prompts": [f"Story {index} that nobody finishes reading"],
            "max_new_tokens": new_tokens,
            "stream": True,
        }
        async with session.post("/generate", json=body, headers={"Cache-Control": "no-cache"}) as response:
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data: ")
                if seen >= chunks:
                    break


def measure_cancellation(base_url: str, requests: int, new_tokens: int) -> dict:
    """Streams closed after a few chunks: how many decoding steps each row ran after its caller left."""
    before = _abort_steps(base_url)
    for index in range(requests):
        asyncio.run(_cancel_mid_stream(base_url, index, 3, new_tokens))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = _abort_steps(base_url)
        if after.get("scheduler_abort_steps_count", 0) - before.get("scheduler_abort_steps_count", 0) >= requests:
            break
        time.sleep(0.1)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    return {
        "requests": requests,
        "freed": delta.get("scheduler_abort_steps_count", 0),
        "freed_within_one_step": delta.get("scheduler_abort_steps_bucket1.0", 0),
        "mean_steps": delta.get("scheduler_abort_steps_sum", 0) / max(1.0, delta.get("scheduler_abort_steps_count", 0)),
    }

"""Closed-loop HTTP load: `concurrency` clients, each sending its next request as soon as one is answered."""

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    failures: int
    wall_s: float
    latencies_s: list[float]
    completion_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def percentile_ms(self, q: int) -> float:
        ordered = sorted(self.latencies_s)
        if len(ordered) == 1:
            return ordered[0] * 1000
        return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1] * 1000


async def run_load(base_url: str, concurrency: int, rounds: int, body_for: Callable[[int, int], dict] | None,
                   path: str = "/generate", timeout_s: float = 600.0) -> LoadResult:
    """Each of `concurrency` clients sends `rounds` requests: POSTs of `body_for(client, round)`, or GETs."""
    latencies: list[float] = []
    failures = 0
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal failures, tokens
        for round_ in range(rounds):
            started = time.perf_counter()
            if body_for is None:
                response = await client.get(path)
            else:
                response = await client.post(path, json=body_for(index, round_))
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                failures += 1
                continue
            items = response.json()
            if isinstance(items, list):
                tokens += sum(item.get("usage", {}).get("completion_tokens", 0) for item in items)

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    return LoadResult(concurrency, len(latencies), failures, wall, latencies, tokens)

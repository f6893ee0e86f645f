"""Closed-loop HTTP load: `concurrency` clients, each sending its next request as soon as one is answered.

The client is aiohttp, not httpx: the load shares the server's cores, and httpx spends about 4 ms of CPU
per request here against aiohttp's 0.2 ms (measured on this project's machine), which would charge the
load generator's cost to the server between batches and cap the cache-hit rate at the client's speed.
"""

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    failures: int
    wall_s: float
    latencies_s: list[float]
    completion_tokens: int
    labelled_s: dict[str, list[float]]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def percentile_ms(self, q: int, label: str | None = None) -> float:
        ordered = sorted(self.latencies_s if label is None else self.labelled_s[label])
        if len(ordered) == 1:
            return ordered[0] * 1000
        return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1] * 1000


async def run_load(
    base_url: str,
    concurrency: int,
    rounds: int,
    body_for: Callable[[int, int], dict] | None,
    path: str = "/generate",
    timeout_s: float = 600.0,
    label_of: Callable[[int, int], str] = lambda client, round_: "all",
) -> LoadResult:
    """Each of `concurrency` clients sends `rounds` requests: POSTs of `body_for(client, round)`, or GETs;
    latencies are also kept per `label_of(client, round)`."""
    latencies: list[float] = []
    labelled: dict[str, list[float]] = {}
    failures = 0
    tokens = 0

    async def client_loop(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal failures, tokens
        for round_ in range(rounds):
            started = time.perf_counter()
            if body_for is None:
                request = session.get(path)
            else:
                request = session.post(path, json=body_for(index, round_))
            async with request as response:
                payload = await response.read()
            latencies.append(time.perf_counter() - started)
            labelled.setdefault(label_of(index, round_), []).append(latencies[-1])
            if response.status != 200:
                failures += 1
                continue
            answer = json.loads(payload)
            # /generate answers a list of items, /v1/completions one object: both carry `usage`.
            for item in answer if isinstance(answer, list) else [answer]:
                tokens += item.get("usage", {}).get("completion_tokens", 0)

    # A connection idle for a second is not reused: servers close idle keep-alive connections after a few seconds
    # (uvicorn's default, ours, is 5), aiohttp would keep them for 15, and a request sent just as the server closes
    # one fails with "Server disconnected" (it stopped a bench run once, in the mixed phase's tail).
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=1.0)
    async with aiohttp.ClientSession(
        base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(session, i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    return LoadResult(concurrency, len(latencies), failures, wall, latencies, tokens, labelled)

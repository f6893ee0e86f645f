"""`python -m server bench --against URL[,URL]`: our server beside other OpenAI-compatible servers (vLLM, llama.cpp's
server, TGI, another build of ours), driven by one client with the same prompts and workloads through
`/v1/completions`, in one run.

- Interleaved: each workload runs on every server in turn, `repeats` times, the first server rotating, so that the
  machine's drift during the run falls on all of them alike; each figure is the median of its repeats.
- Workloads, non-streamed greedy completions: `lone` (one client, one request at a time: p50 latency), `c=N` (N
  clients in a closed loop: requests/s) and `mixed c=N` (as c=N, one request in LONG_EVERY asks `long_tokens`).
- Same work everywhere: the same prompts for every server, each distinct (no cache can answer) from its opening
  (no prompt-prefix cache computes part of it: `opened`), and `ignore_eos:
  true` to every server that accepts it (one probe request finds out), so that each generates exactly `max_tokens`
  tokens; `usage` shows what a server that refuses it generated.
- Distinct from every earlier run's too: the servers compared may outlive a run, and each run's prompts carry a tag
  of their own. A llama.cpp server that had already served a run's prompts reused its slots' prompt caches and
  skipped most of their prefill (q8_0 on an AMD EPYC Zen 4: 34 req/s at 32 clients against 18 on new prompts);
  another server of ours would have answered them from its response cache.
- Each server is asked for the first model of its `/v1/models`. A server not answering `/v1/completions` stops the
  run with its answer, before anything is measured.
"""

import asyncio
import hashlib
import secrets
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import aiohttp
from tqdm import tqdm

from server.bench.limits import prompt
from server.bench.load import LoadResult, run_load
from server.bench.scheduling import LONG_EVERY

OURS = "ours"


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    ignore_eos: bool


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    rounds: int
    long_tokens: int | None = None


def base_url(url: str) -> str:
    """The server's root, whether given with `/v1` or not."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


class Unusable(RuntimeError):
    """A server to compare cannot be driven: what it answered, or why it did not."""


async def discover(name: str, url: str) -> Target:
    """The server's first model, and whether it takes `ignore_eos`; `Unusable` when it cannot serve the run."""
    try:
        return await _discover(name, url)
    except (aiohttp.ClientError, TimeoutError, KeyError, IndexError, ValueError) as exc:
        raise Unusable(f"{url}: {type(exc).__name__}: {exc}") from None


async def _discover(name: str, url: str) -> Target:
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with session.get("/v1/models") as response:
            if response.status != 200:
                raise Unusable(f"{url}/v1/models answered {response.status}: {(await response.text())[:300]}")
            model = (await response.json())["data"][0]["id"]
        probe = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        for ignore_eos in (True, False):
            body = probe | ({"ignore_eos": True} if ignore_eos else {})
            async with session.post("/v1/completions", json=body) as response:
                answer = await response.text()
                if response.status == 200:
                    return Target(name, url, model, ignore_eos)
        raise Unusable(f"{url}/v1/completions answered {response.status}: {answer[:300]}")


def workloads(concurrency: int, rounds: int, mixed_rounds: int, long_tokens: int) -> list[Workload]:
    return [
        Workload("lone", 1, rounds),
        Workload(f"c={concurrency}", concurrency, rounds),
        Workload(f"mixed c={concurrency}", concurrency, mixed_rounds, long_tokens),
    ]


def opened(tag: str, client: int, round_: int) -> str:
    """The bench's prompt, opened by eight hex digits of its own, so that no two prompts share more than their
    first token or so: llama.cpp's server keeps each slot's last prompt and computes only what follows the longest
    prefix a new one shares with it, and with the shared opening of the bench's prompts ("Request <tag>-...") its
    f32 server prefilled a 36-token prompt in 17 to 21 ms instead of 68 to 72 (an AMD EPYC Zen 4, 2026-12-07)."""
    return f"{hashlib.sha256(f'{tag}/{client}/{round_}'.encode()).hexdigest()[:8]} {prompt(tag, client, round_)}"


def body_for(target: Target, workload: Workload, tag: str, new_tokens: int) -> Callable[[int, int], dict]:
    def body(client: int, round_: int) -> dict:
        long = workload.long_tokens is not None and (client + round_) % LONG_EVERY == 0
        payload = {
            "model": target.model,
            "prompt": opened(tag, client, round_),
            "max_tokens": workload.long_tokens if long and workload.long_tokens else new_tokens,
            "temperature": 0,
        }
        return payload | ({"ignore_eos": True} if target.ignore_eos else {})

    return body


def _figures(results: list[LoadResult]) -> dict:
    return {
        "requests": sum(result.requests for result in results),
        "failures": sum(result.failures for result in results),
        "p50_ms": statistics.median(result.percentile_ms(50) for result in results),
        "requests_per_s": statistics.median(result.requests_per_s for result in results),
        "tokens_per_s": statistics.median(result.tokens_per_s for result in results),
        "repeats": [{"p50_ms": r.percentile_ms(50), "requests_per_s": r.requests_per_s} for r in results],
    }


def compare(targets: list[Target], plan: list[Workload], repeats: int, new_tokens: int, bar: tqdm) -> dict:
    """Every workload on every target, `repeats` times, interleaved; figures per target and workload, with ours as
    the reference (`vs_ours`: requests/s over ours; for `lone`, p50 over ours)."""
    runs: dict[str, dict[str, list[LoadResult]]] = {t.name: {w.name: [] for w in plan} for t in targets}
    run = secrets.token_hex(3)
    # One unmeasured round of every workload on every server first, on prompts of its own: what a server does once,
    # at its first load at full width (first touch of its memory, lazy set-up), is charged to none of the repeats.
    for target in targets:
        for workload in plan:
            body = body_for(target, workload, f"{run}-warmup", new_tokens)
            asyncio.run(run_load(target.url, workload.concurrency, 1, body, "/v1/completions"))
    for repeat in range(repeats):
        for workload in plan:
            first = repeat % len(targets)
            for target in targets[first:] + targets[:first]:
                bar.set_postfix_str(f"{workload.name} on {target.name}")
                body = body_for(target, workload, f"{run}-vs{repeat}-{workload.name}", new_tokens)
                result = asyncio.run(
                    run_load(target.url, workload.concurrency, workload.rounds, body, "/v1/completions")
                )
                runs[target.name][workload.name].append(result)
                bar.update(1)
    figures = {name: {w: _figures(results) for w, results in by_workload.items()} for name, by_workload in runs.items()}
    ours = figures[targets[0].name]
    for by_workload in figures.values():
        for workload in plan:
            row, reference = by_workload[workload.name], ours[workload.name]
            row["vs_ours"] = (
                row["p50_ms"] / reference["p50_ms"]
                if workload.name == "lone"
                else row["requests_per_s"] / reference["requests_per_s"]
            )
    return {
        "servers": [asdict(target) for target in targets],
        "workloads": [asdict(workload) for workload in plan],
        "repeats": repeats,
        "new_tokens": new_tokens,
        "results": figures,
    }


def table(against: dict) -> str:
    names = [workload["name"] for workload in against["workloads"]]
    header = [f"{name} p50 ms" if name == "lone" else f"{name} req/s" for name in names]
    lines = [
        f"/v1/completions, {against['new_tokens']} new tokens, greedy, median of {against['repeats']} interleaved "
        f"repeats; in parentheses: against {OURS} (p50: lower is better; req/s: higher is better)",
        "",
        "| server | model | ignore_eos | " + " | ".join(header) + " | failures |",
        "|---|---|---|" + "---:|" * (len(names) + 1),
    ]
    for server in against["servers"]:
        rows = against["results"][server["name"]]
        cells = [
            f"{rows[name]['p50_ms' if name == 'lone' else 'requests_per_s']:.1f} ({rows[name]['vs_ours']:.2f}x)"
            for name in names
        ]
        failures = sum(rows[name]["failures"] for name in names)
        lines.append(
            f"| {server['name']} | {server['model']} | {'yes' if server['ignore_eos'] else 'no'} | "
            + " | ".join(cells)
            + f" | {failures} |"
        )
    return "\n".join(lines)

"""Three server processes sharing one Redis and one PostgreSQL behind HAProxy (deploy/haproxy.cfg), under load."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.core.config import PROJECT_ROOT
from tests.conftest import _create_database
from tests.support.servers import HAProxyServer, PostgresServer, RedisServer, free_port

WORKERS = 4
PREDICT_BURST = 12
# Two failed checks one second apart take a replica out; the rest is the check's own timeout and scheduling.
OUT_WITHIN_S = 6.0


class Replica:
    """`python -m server serve` on a port of its own; stopped and started again on the same port."""

    def __init__(self, name: str, env: dict[str, str], directory: Path):
        self.name, self.env, self.port = name, env, free_port()
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--port", str(self.port)],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout_s} s; see {self.log}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 60) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout_s)
        self.process = None


@dataclass
class Cluster:
    replicas: list[Replica]
    haproxy: HAProxyServer

    def wait_states(self, expected: dict[str, str], timeout_s: float) -> float:
        """Seconds until HAProxy reports `expected` (server name -> UP/DOWN), else AssertionError."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            states = self.haproxy.states()
            if all(states.get(name) == state for name, state in expected.items()):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"HAProxy still reports {self.haproxy.states()}, expected {expected}")

    def all_up(self) -> None:
        self.wait_states({f"app{i}": "UP" for i in (1, 2, 3)}, 30)


@pytest.fixture(scope="module")
def cluster(standins, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("replicas")
    asyncio.run(_create_database(postgres, "replicas"))
    redis = RedisServer(directory / "redis").start()
    generator, classifier = standins
    env = {
        "GENERATOR_MODEL": str(generator),
        "SENTIMENT_MODEL": str(classifier),
        "MODEL_SOURCE": "local",
        "DATABASE_URL": postgres.url("replicas"),
        "REDIS_URL": redis.url,
        "TORCH_NUM_THREADS": "1",
        "LOG_LEVEL": "warning",
        "INGRESS_RATE_LIMIT": "off",
        "INGRESS_RATE_LIMIT_PREDICT": f"{PREDICT_BURST}/hour;burst={PREDICT_BURST}",
    }
    replicas = [Replica(f"app{i}", env, directory) for i in (1, 2, 3)]
    haproxy = HAProxyServer([f"127.0.0.1:{replica.port}" for replica in replicas])
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        haproxy.start()
        cluster = Cluster(replicas, haproxy)
        cluster.all_up()
        yield cluster
    finally:
        haproxy.stop()
        for replica in replicas:
            replica.stop(signal.SIGKILL)
        redis.stop()


@dataclass
class Load:
    """Closed-loop /generate clients through HAProxy; each request's start, end and outcome."""

    url: str
    outcomes: list[tuple[float, float, str]] = field(default_factory=list)
    running: bool = True

    async def worker(self, index: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            sent = 0
            while self.running:
                started = time.monotonic()
                try:
                    response = await client.post(
                        "/generate", json={"prompts": [f"load {index} {sent}"], "max_new_tokens": 4}
                    )
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.outcomes.append((started, time.monotonic(), outcome))
                sent += 1

    def failures(self) -> list[tuple[float, float, str]]:
        return [entry for entry in self.outcomes if entry[2] != "200"]


async def under_load(cluster: Cluster, action) -> Load:
    load = Load(cluster.haproxy.url)
    workers = [asyncio.create_task(load.worker(i)) for i in range(WORKERS)]
    try:
        await asyncio.sleep(1)
        await action(load)
        await asyncio.sleep(1)
    finally:
        load.running = False
        await asyncio.gather(*workers)
    return load


async def test_a_cache_entry_computed_through_one_replica_is_a_hit_through_the_others(cluster):
    body = {"prompts": ["one replica computes, the others read"], "max_new_tokens": 4}
    async with httpx.AsyncClient(timeout=60) as client:
        first = await client.post(f"{cluster.replicas[0].url}/generate", json=body)
        others = [await client.post(f"{replica.url}/generate", json=body) for replica in cluster.replicas[1:]]
    assert first.headers["x-cache"] == "MISS"
    assert [response.headers["x-cache"] for response in others] == ["HIT", "HIT"]
    assert {response.json()[0]["completion"] for response in (first, *others)} == {first.json()[0]["completion"]}


async def test_the_per_client_rate_limit_is_exact_across_the_replicas(cluster):
    """One client's requests spread over the three replicas (directly and through HAProxy) share one budget."""
    urls = [replica.url for replica in cluster.replicas] + [cluster.haproxy.url]
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(
            *(client.post(f"{urls[i % 4]}/predict", json={"text": f"limit {i}"}) for i in range(2 * PREDICT_BURST))
        )
    codes = [response.status_code for response in responses]
    assert codes.count(200) == PREDICT_BURST and codes.count(429) == PREDICT_BURST, codes


async def test_a_rolling_restart_fails_no_request(cluster):
    """Each replica in turn gets SIGTERM under load: it drains (readiness 503 for DRAIN_S while it still serves),
    HAProxy takes it out, it comes back; no request fails."""

    async def roll(load: Load) -> None:
        for index, replica in enumerate(cluster.replicas, 1):
            await asyncio.to_thread(replica.stop, signal.SIGTERM)
            replica.start()
            await asyncio.to_thread(replica.wait_ready)
            await asyncio.to_thread(cluster.wait_states, {f"app{index}": "UP"}, 30)

    load = await under_load(cluster, roll)
    assert load.failures() == [] and len(load.outcomes) > WORKERS, Counter(outcome for _, _, outcome in load.failures())


# Last: the killed replica stays down (a restart would cost a model load).
async def test_sigkill_fails_only_requests_in_flight_and_haproxy_stops_routing_to_it(cluster):
    await asyncio.to_thread(cluster.all_up)
    victim = cluster.replicas[2]
    killed: dict[str, float] = {}

    async def kill(load: Load) -> None:
        killed["at"] = time.monotonic()
        os.kill(victim.process.pid, signal.SIGKILL)
        # A killed process keeps its sockets open while the kernel frees its memory (a fraction of a second for a
        # process holding models): requests that reached it meanwhile were in flight on it.
        await asyncio.to_thread(victim.process.wait, 10)
        killed["gone"] = time.monotonic()
        killed["out_after_s"] = await asyncio.to_thread(cluster.wait_states, {"app3": "DOWN"}, 30)
        await asyncio.sleep(1)

    load = await under_load(cluster, kill)
    victim.process = None
    assert killed["out_after_s"] <= OUT_WITHIN_S
    failures = load.failures()
    assert len(failures) <= WORKERS, failures
    assert all(started < killed["gone"] for started, _, _ in failures), (killed, failures)
    assert sum(1 for started, _, outcome in load.outcomes if started > killed["gone"] and outcome == "200") > 0

import asyncio
import json
import subprocess
import sys

import httpx
from tqdm import tqdm

from server.bench import against
from server.bench.limits import prompt
from server.core.config import PROJECT_ROOT
from tests.support.metrics import counted
from tests.support.servers import free_port, start_server


def test_against_drives_another_server_through_the_same_workloads_interleaved(standins, tmp_path):
    """`bench --against` with a second instance of our own server, and ours in fp32 and int8 started by the bench:
    all get every workload, the same number of requests, `ignore_eos` (ours takes it), and figures against ours."""
    other, port = start_server(standins, tmp_path, INGRESS_RATE_LIMIT="off", API_KEYS="")
    url = f"http://127.0.0.1:{port}/v1"
    output = tmp_path / "against.json"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "server", "bench", "--quick", "--against", url, "--ours", "fp32,int8"]
            + ["--output", str(output)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text if run.returncode == 0 else ""
    finally:
        other.terminate()
        other.wait(30)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(output.read_text())
    compared = results["against"]
    served = counted(metrics, "http_requests_total", 'route="/v1/completions"')
    base = url.removesuffix("/v1")
    assert [server["name"] for server in compared["servers"]] == ["ours", "ours int8", base]
    assert all(server["ignore_eos"] for server in compared["servers"])
    models = {server["name"]: server["model"] for server in compared["servers"]}
    assert models["ours int8"] == f"{models['ours']}:int8" and models[base] == models["ours"]
    assert [workload["name"] for workload in compared["workloads"]] == ["lone", "c=4", "mixed c=4"]
    repeats = compared["repeats"]
    for name in ("ours", "ours int8", base):
        for workload in compared["workloads"]:
            row = compared["results"][name][workload["name"]]
            assert row["failures"] == 0
            assert row["requests"] == repeats * workload["concurrency"] * workload["rounds"]
            assert len(row["repeats"]) == repeats and row["requests_per_s"] > 0 and row["tokens_per_s"] > 0
    measured = sum(row["requests"] for row in compared["results"][base].values())
    # Besides the discovery probes, one unmeasured round of every workload at its width.
    assert served - measured >= sum(workload["concurrency"] for workload in compared["workloads"])
    ours, theirs = compared["results"]["ours"], compared["results"][base]
    assert all(ours[workload]["vs_ours"] == 1 for workload in ours)
    assert theirs["lone"]["vs_ours"] == theirs["lone"]["p50_ms"] / ours["lone"]["p50_ms"]
    assert theirs["c=4"]["vs_ours"] == theirs["c=4"]["requests_per_s"] / ours["c=4"]["requests_per_s"]
    assert results["machine"]["cpu"] and "torch_cpu_capability" in results["machine"]
    assert f"| {base} |" in run.stdout and "| ours |" in run.stdout and "| ours int8 |" in run.stdout
    assert "CPU " in run.stdout


def test_a_second_run_sends_prompts_no_server_has_seen(standins, tmp_path):
    """The servers compared may outlive a run: a second run against the same server of ours finds nothing of the
    first in its response cache (nor would llama.cpp's slots find their prompts cached)."""
    other, port = start_server(standins, tmp_path, INGRESS_RATE_LIMIT="off", API_KEYS="")
    url = f"http://127.0.0.1:{port}"
    try:
        target = asyncio.run(against.discover(against.OURS, url))
        plan = [against.Workload("lone", 1, 2)]
        for _ in range(2):
            against.compare([target], plan, repeats=1, new_tokens=2, bar=tqdm(disable=True))
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        other.terminate()
        other.wait(30)
    # Each run: its warm-up round and its two measured requests, all computed.
    assert counted(metrics, "cache_requests_total", 'result="miss"') >= 2 * 3
    assert counted(metrics, "cache_requests_total", 'result="hit"') == 0


def test_our_precisions_must_be_known_ones():
    run = subprocess.run(
        [sys.executable, "-m", "server", "bench", "--quick", "--against", "http://127.0.0.1:1", "--ours", "fp32,fp8"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "argument --ours: 'fp32,fp8': expected one or more of fp32, int8, bf16" in run.stderr


def test_a_server_that_cannot_be_driven_stops_the_run_with_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "server", "bench", "--quick", "--against", url],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"bench --against: {url}: ClientConnectorError")


def test_prompts_differ_from_their_first_word_so_that_no_prefix_cache_computes_part_of_one():
    """llama.cpp's server computes only what follows the longest prefix a prompt shares with its slot's last one."""
    target = against.Target("other", "http://127.0.0.1:1", "model", ignore_eos=True)
    body = against.body_for(target, against.Workload("c=32", 32, 12), "run-vs0-c=32", 16)
    prompts = {(client, round_): body(client, round_)["prompt"] for client in range(32) for round_ in range(12)}
    assert len({text.split()[0] for text in prompts.values()}) == len(prompts)
    assert all(text.split(" ", 1)[1] == prompt("run-vs0-c=32", *key) for key, text in prompts.items())

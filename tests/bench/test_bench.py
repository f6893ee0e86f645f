import json
import subprocess
import sys

from server.core.config import PROJECT_ROOT


def test_quick_bench_measures_every_phase_and_writes_json(tmp_path):
    """The harness end to end with the tiny model: offline limits, real server, baseline, ratios, JSON, table."""
    output = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "server", "bench", "--quick", "--output", str(output)],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results["offline"]) == {"batch_1", "batch_32", "fast_batch_1", "fast_batch_32"}
    assert results["offline"]["batch_32"]["brackets"] == 3
    assert [row["concurrency"] for row in results["server"]] == [1, 4]
    assert [row["concurrency"] for row in results["baseline"]] == [1, 4]
    for row in results["server"]:
        assert row["failures"] == 0 and row["requests"] == row["concurrency"] * 2
        assert row["mean_batch_size"] >= 1 and row["tokens_per_s"] > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        for ratio in ("vs_offline_full_batch_throughput", "p50_vs_offline_batch_1_latency", "vs_baseline_throughput"):
            assert row[ratio] > 0
        limit = row["offline"]["batch_32"]["requests_per_s"]
        assert row["vs_offline_full_batch_throughput"] == row["requests_per_s"] / limit
    assert all(row["failures"] == 0 for row in results["baseline"])
    cache = results["cache"]
    assert cache["backend"] == "redis" and cache["failures"] == 0
    assert 0 < cache["hit_p50_ms"] <= cache["hit_p99_ms"] and cache["hits_vs_trivial_endpoint"] > 0
    background = results["background"]
    assert background["items"] == 16 and background["failures"] == 0 and background["background_items_per_s"] > 0
    assert background["idle_p50_ms"] > 0 and background["busy_vs_idle_p50"] > 0
    assert "background local job (16 items" in run.stdout
    assert "| server | 4 |" in run.stdout and "| baseline | 1 |" in run.stdout and "cache hits (redis)" in run.stdout
    mixed = results["mixed"]
    for scheduler in ("continuous", "static"):
        assert mixed[scheduler]["failures"] == 0 and mixed[scheduler]["requests"] == 4 * 2
        assert 0 < mixed[scheduler]["short_p50_ms"] and mixed[scheduler]["long_p50_ms"] > 0
    assert mixed["throughput_vs_static"] == mixed["continuous"]["requests_per_s"] / mixed["static"]["requests_per_s"]
    streaming = results["streaming"]
    assert streaming["rounds"] == 3 and streaming["ttft_p50_ms"] > 0 and streaming["prefill_p50_ms"] > 0
    assert streaming["cancellation"]["freed"] == 4
    assert "mixed lengths (4 clients" in run.stdout and "streaming c=1: first token" in run.stdout
    engines = results["engines"]
    assert engines["gemm_gflops"] > 0 and engines["compared"] == 32 and 0 <= engines["fast_identical"] <= 32
    assert engines["fast_vs_transformers_batch"] == engines["fast"]["tokens_per_s"] / engines["transformers"]["tokens_per_s"]
    assert all(row["vs_fast_full_batch_throughput"] > 0 for row in results["server"])
    assert "fast path (our loop, oneDNN fp32)" in run.stdout

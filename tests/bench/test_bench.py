import json
import re
import subprocess
import sys

from server.bench.limits import ENGINES
from server.core.config import PROJECT_ROOT
from tests.support.models import SCREEN


def test_quick_bench_measures_every_phase_and_writes_json(tmp_path):
    """The harness end to end with the tiny model: offline limits, real server, baseline, ratios, JSON, table."""
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "server", "bench", "--quick", "--output", str(output)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(output.read_text())
    # bfloat16 where the CPU has bf16 units, as the bench decides for itself.
    half = ["int8_", "bf16_"] if "bf16_" in ENGINES else ["int8_"]
    assert set(results["offline"]) == {f"{engine}batch_{size}" for engine in ["", "fast_", *half] for size in (1, 32)}
    # Brackets around each level: fp32 server 1, 4; int8 server 1, 4 (and bf16 server 1, 4): 3 per server.
    assert results["offline"]["batch_32"]["brackets"] == 3 * (1 + len(half))
    assert [(row["engine"], row["concurrency"]) for row in results["server"]] == [
        ("fast_", 1),
        ("fast_", 4),
        *[(engine, c) for engine in half for c in (1, 4)],
    ]
    assert [row["concurrency"] for row in results["baseline"]] == [1, 4]
    for row in results["server"]:
        assert row["failures"] == 0 and row["requests"] == row["concurrency"] * 2
        assert row["mean_batch_size"] >= 1 and row["tokens_per_s"] > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        for ratio in (
            "vs_offline_full_batch_throughput",
            "p50_vs_offline_batch_1_latency",
            "vs_own_full_batch_throughput",
            "p50_vs_own_batch_1_latency",
            "vs_baseline_throughput",
        ):
            assert row[ratio] > 0
        reference = row["offline"]["batch_32"]["requests_per_s"]
        assert row["vs_offline_full_batch_throughput"] == row["requests_per_s"] / reference
        own = row["offline"][f"{row['engine']}batch_32"]["requests_per_s"]
        assert row["vs_own_full_batch_throughput"] == row["requests_per_s"] / own
    assert all(row["failures"] == 0 for row in results["baseline"])
    cache = results["cache"]
    assert cache["backend"] == "redis" and cache["failures"] == 0
    assert 0 < cache["hit_p50_ms"] <= cache["hit_p99_ms"] and cache["hits_vs_trivial_endpoint"] > 0
    background = results["background"]
    assert background["items"] == 16 and background["failures"] == 0 and background["background_items_per_s"] > 0
    assert background["idle_p50_ms"] > 0 and background["busy_vs_idle_p50"] > 0
    assert "background local job (16 items" in run.stdout
    assert "| server | int8, our loop | 4 |" in run.stdout and "cache hits (redis)" in run.stdout
    assert "| baseline | transformers fp32 (naive server) | 1 |" in run.stdout
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
    assert engines["gemm_gflops"] > 0 and engines["int8_gemm_gops"] > 0 and engines["compared"] == 32
    assert engines["transformers_"]["identical"] == engines["transformers_"]["identical_lone"] == 32
    assert engines["transformers_"]["vs_transformers_batch"] == 1
    for engine in ["fast_", *half]:
        assert 0 <= engines[engine]["identical"] <= 32 and 0 <= engines[engine]["identical_lone"] <= 32
        assert engines[engine]["share_of_gemm_limit"] > 0
    fast, reference = engines["fast_"], engines["transformers_"]
    assert fast["vs_transformers_batch"] == fast["tokens_per_s"] / reference["tokens_per_s"]
    assert "| fp32, our loop, kernels measured here |" in run.stdout and "| int8, our loop |" in run.stdout
    assert engines["memory_gbps"] > 0 and 0 < fast["lone_share_of_memory"]
    # Which kernels each model runs, and why, in the JSON and the table.
    assert "oneDNN where it beat torch's GEMM over 1 and 32 rows" in results["kernels"]
    assert "oneDNN where it beat torch's GEMM over 32 and 512 rows" in results["classifier"]["kernels"]
    assert f"fp32 kernels: generator {results['kernels']}" in run.stdout
    assert "int8: oneDNN where it beat fbgemm's int8 GEMM over 1 and 32 rows" in results["int8_kernels"]
    assert "int8: oneDNN where it beat fbgemm's int8 GEMM over 32 and 512" in results["classifier"]["int8_kernels"]
    assert f"int8 kernels: generator {results['int8_kernels']}" in run.stdout
    assert f"memory pages (the fp32 generator's): {results['memory_pages']}" in run.stdout
    assert re.match(r"\d+ of \d+ MiB moved to 2 MiB pages|nothing to move|left on 4 KiB pages", results["memory_pages"])
    assert f"LM head screen (the fp32 generator's): {results['head_screen']}" in run.stdout
    assert re.match(SCREEN, results["head_screen"])
    if "bf16_" in ENGINES:
        assert results["bf16_kernels"].startswith(("onednn: bfloat16: oneDNN where it beat", "mixed: bfloat16:"))
        assert engines["bf16_gemm_gflops"] > 0 and engines["bf16_"]["precision"] == "bf16"
        assert "| server | bfloat16, our loop, kernels measured here | 4 |" in run.stdout
    for precision in ("fp32", "int8"):
        predict = results["predict"][precision]
        assert predict["failures"] == 0 and predict["requests"] == 4 * 2 and predict["concurrency"] == 4
        assert predict["vs_offline"] == predict["items_per_s"] / predict["offline_items_per_s"]
        assert f"sentiment /predict {precision} at concurrency 4" in run.stdout
    classifier = results["classifier"]
    assert classifier["compared"] == 256 and classifier["reference_items_per_s"] > 0
    for precision in ("fp32", "int8"):
        assert 0 <= classifier[precision]["identical_labels"] <= 256 and classifier[precision]["vs_reference"] > 0
    assert "sentiment classifier offline at batch 32: transformers fp32" in run.stdout

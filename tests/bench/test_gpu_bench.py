"""The GPU bench's offline measurements, ratios and table, exercised on the CPU with the tiny stand-in (the numbers
mean nothing here; scripts/gpu-check.sh runs it on a GPU)."""

from server.bench.gpu import GpuOffline, table, targets
from server.ml.generator import TextGenerator
from server.ml.loader import locate


def test_offline_rows_compare_our_loop_with_generate_and_the_targets_come_from_them(standins):
    location = locate(str(standins[0]), "generator", "local", standins[0].parent)
    offline = GpuOffline(TextGenerator.load(location, str(standins[0].parent)), repeats=1)
    rows = [offline.measure(1, 3), offline.measure(4, 3)]
    assert [row["greedy_identical"] for row in rows] == ["1/1", "4/4"]
    assert all(row[engine]["tokens_per_s"] > 0 for row in rows for engine in ("transformers_generate", "our_loop"))
    server = [
        {
            "concurrency": 4,
            "new_tokens": 3,
            "tokens_per_s": rows[1]["our_loop"]["tokens_per_s"] / 2,
            "requests_per_s": 1.0,
            "p50_ms": 1.0,
            "p95_ms": 2.0,
            "failures": 0,
        }
    ]
    found = targets(rows, server, batch=4)
    assert found["greedy_identical"] == "5/5"
    assert found["new_tokens_3"]["server_vs_our_loop_offline"] == 0.5
    assert found["new_tokens_3"]["our_loop_vs_generate_latency_batch_1"] == rows[0]["our_loop_vs_generate_latency"]
    results = {
        "machine": {"name": "cpu"},
        "dtype": "float32",
        "when": "now",
        "offline": rows,
        "server": server,
        "streaming": {},
        "targets": found,
    }
    assert "| 4 | 3 |" in table(results)

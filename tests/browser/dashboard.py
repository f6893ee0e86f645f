"""Reading the dashboard in the browser and comparing it with the JSON endpoints it shows."""

import json
import math
import re
import time
from collections.abc import Callable

import httpx
from playwright.sync_api import Page

WAIT_S = 30
# Every figure of the page: its name (data-figure), raw JSON value (data-value) and text.
SNAPSHOT = """() => ({
  request: document.querySelector("#serving").dataset.request || null,
  figures: Object.fromEntries(Array.from(document.querySelectorAll("[data-figure]"))
    .filter(element => element.dataset.value !== undefined)
    .map(element => [element.dataset.figure, {value: element.dataset.value, text: element.textContent}])),
})"""


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` until it holds; fail after `timeout_s` naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def expected_figures(client: httpx.Client, aggregated_body: dict) -> dict[str, tuple[object, str]]:
    """name -> (value, kind) for every figure the page should show, read from the JSON endpoints now."""
    aggregated = client.post("/metrics/aggregated", json=aggregated_body).raise_for_status().json()
    total, live = aggregated["total"], aggregated["live"]
    stats = client.get("/batch/stats").raise_for_status().json()
    queue = client.get("/batch/queue/status").raise_for_status().json()
    savings = client.get("/batch/savings").raise_for_status().json()
    count = client.get("/metrics/count").raise_for_status().json()
    cache = client.get("/cache").raise_for_status().json()
    # `live` (this process, every tenant) is null for a key that is not an admin's: the page shows none of it.
    models = live["models"].items() if live is not None else []
    batches, items = sum(m["batches"] for _, m in models), sum(m["items"] for _, m in models)
    figures = {
        "serving.rps": (total["throughput_rps"], "rate"),
        "serving.requests": (total["requests"], "int"),
        "serving.p50": (total["latency_ms"]["p50"], "ms"),
        "serving.p95": (total["latency_ms"]["p95"], "ms"),
        "serving.errors": (total["errors"], "int"),
        "serving.error_rate": (total["error_rate"], "ratio"),
        "serving.cache_hit_ratio": (total["cache_hit_ratio"], "ratio"),
        "serving.items": (total["items"], "int"),
        "cache.backend": (cache["backend"], "text"),
        "cache.entries": (cache["entries"], "int"),
        "cache.hit_ratio": (cache["hit_ratio"], "ratio"),
        **{f"count.{name}": (count[name], "int") for name in ("generations", "predictions", "total")},
        "batch.queued": (queue["waiting"], "int"),
        "batch.processed": (
            sum(stats["items"]["by_status"].get(s, 0) for s in ("succeeded", "failed", "expired")),
            "int",
        ),
        "batch.active": (sum(stats["jobs"]["by_status"].get(s, 0) for s in ("submitted", "in_progress")), "int"),
        "batch.success_rate": (stats["success_rate"], "ratio"),
        "batch.jobs": (stats["jobs"]["total"], "int"),
        "batch.savings": (savings["total"]["savings_usd"], "usd"),
    }
    if live is not None:
        figures |= {
            "serving.queue_depth": (sum(m["queue_depth"] for _, m in models), "int"),
            "serving.mean_batch_size": (items / batches if batches else None, "decimal"),
        }
    for name, model in models:
        figures |= {
            f"process.{name}.queue_depth": (model["queue_depth"], "int"),
            f"process.{name}.batches": (model["batches"], "int"),
            f"process.{name}.mean_batch_size": (model["mean_batch_size"], "decimal"),
        }
    for layer in ("ingress", "egress") if live is not None else ():
        for policy in live[layer]:
            figures |= {
                f"limits.{layer}.{policy['name']}.allowed": (policy["allowed"], "int"),
                f"limits.{layer}.{policy['name']}.denied": (policy["denied"], "int"),
            }
    for group, key in (("provider", "by_provider"), ("job_type", "by_job_type")):
        for name, money in savings[key].items():
            figures |= {
                f"savings.{group}.{name}": (money["savings_usd"], "usd"),
                f"savings.{group}.{name}.jobs": (money["jobs"], "int"),
                f"savings.{group}.{name}.cost": (money["cost_usd"], "usd"),
                f"savings.{group}.{name}.realtime": (money["realtime_cost_usd"], "usd"),
            }
    for breakdown in ("by_job_type", "by_provider", "by_priority"):
        figures |= {f"queue.{breakdown}.{name}": (n, "int") for name, n in queue[breakdown].items()}
    return figures


def _same(shown: str, expected: object) -> bool:
    """The page's data-value (JavaScript's `String(value)`, "" for null) against the JSON value."""
    if expected is None:
        return shown == ""
    if isinstance(expected, str):
        return shown == expected
    return shown != "" and float(shown) == expected


def _number(text: str) -> float:
    return float(re.sub(r"[$,%\s]|ms", "", text))


def check_text(name: str, text: str, value: object, kind: str) -> None:
    """The text shows the value, rounded as its kind says (to the precision of the displayed digits)."""
    if value is None:
        assert text == "–", (name, text)
    elif kind == "text":
        assert text == value, (name, text)
    elif kind == "int":
        assert text == f"{value:,}", (name, text, value)
    else:
        expected = value * 100 if kind == "ratio" else value
        suffix = {"ms": " ms", "ratio": "%"}.get(kind, "")
        assert text.endswith(suffix) and (kind != "usd" or text.startswith("$")), (name, text)
        # Half a unit of the last digit shown (significant digits for `rate` and sub-dollar `usd`).
        relative = {"rate": 0.005, "usd": 0.05 if abs(value) < 1 else 0}.get(kind, 0)
        absolute = {"ms": 0.05, "ratio": 0.05, "decimal": 0.005, "usd": 0.005}.get(kind, 0)
        assert math.isclose(_number(text), expected, rel_tol=relative, abs_tol=absolute + 1e-12), (name, text, value)


def wait_for_json_figures(page: Page, client: httpx.Client, required: set[str]) -> dict[str, tuple[object, str]]:
    """Wait until every figure the JSON endpoints hold is on the page, showing the JSON's value (the page polls; the
    JSON is read again each time, for the window the page asked), then check each text. `required` must be among
    them. Returns the figures compared."""
    mismatches: list = []
    deadline = time.monotonic() + WAIT_S
    while True:
        snapshot = page.evaluate(SNAPSHOT)
        if snapshot["request"] is not None:
            expected = expected_figures(client, json.loads(snapshot["request"]))
            shown = snapshot["figures"]
            mismatches = [
                (name, shown.get(name), value)
                for name, (value, _) in expected.items()
                if name not in shown or not _same(shown[name]["value"], value)
            ]
            if not mismatches and required <= expected.keys():
                break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the page does not show the JSON's figures within {WAIT_S} s: {mismatches}, required {required}"
            )
        time.sleep(0.25)
    for name, (value, kind) in expected.items():
        check_text(name, shown[name]["text"], value, kind)
    return expected

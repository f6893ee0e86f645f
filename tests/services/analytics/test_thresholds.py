import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from server.db import migrate
from server.db.analytics_models import HISTOGRAM_COLUMNS
from server.db.session import create_engine, session_factory
from server.services.analytics.aggregate import Stats
from server.services.analytics.rollups import bucket_of
from server.services.analytics.thresholds import Breach, Thresholds, audit_trail, breaches, load, store

START = datetime(2026, 11, 20, 10, tzinfo=UTC)
CALM = {"generator": 2.0, "classifier": 0.0}


def window(latencies_ms: list[float], *, errors: int = 0, items: int | None = None, cached: int = 0) -> Stats:
    """An hour's stats of requests with these latencies, as the rollups histogram them."""
    histogram = [0] * len(HISTOGRAM_COLUMNS)
    for latency in latencies_ms:
        histogram[bucket_of(latency)] += 1
    return Stats(
        START,
        START + timedelta(hours=1),
        requests=len(latencies_ms),
        items=len(latencies_ms) if items is None else items,
        errors=errors,
        cached_items=cached,
        latency_sum_ms=sum(latencies_ms),
        latency_max_ms=max(latencies_ms, default=0.0),
        histogram=histogram,
    )


def names(found: list[Breach]) -> list[str]:
    return [breach.threshold for breach in found]


def test_a_healthy_window_breaches_nothing():
    assert breaches(Thresholds(), window([40.0] * 20, errors=1), CALM) == []


def test_a_slow_window_breaches_p95_with_its_measured_value():
    assert breaches(Thresholds(), window([1200.0] * 20), CALM) == [Breach("p95_latency_ms", 1000.0, 1200.0)]


def test_a_value_at_the_limit_is_no_breach():
    assert breaches(Thresholds(), window([1000.0] * 20, errors=1), {"generator": 100}) == []


def test_p99_is_off_by_default_and_judged_when_set():
    # Two slow requests in a hundred: beyond the 99th percentile's rank, not the 95th's.
    stats = window([10.0] * 98 + [800.0] * 2)
    assert breaches(Thresholds(), stats, CALM) == []
    assert breaches(Thresholds(p99_latency_ms=500), stats, CALM) == [Breach("p99_latency_ms", 500, 800.0)]


def test_an_error_rate_above_the_limit_breaches():
    assert breaches(Thresholds(), window([40.0] * 20, errors=2), CALM) == [Breach("error_rate", 0.05, 0.1)]


def test_the_cache_hit_ratio_breaches_below_its_minimum_only_when_items_were_computed():
    limits = Thresholds(min_cache_hit_ratio=0.5)
    assert breaches(limits, window([40.0] * 4, items=10, cached=4), CALM) == [Breach("min_cache_hit_ratio", 0.5, 0.4)]
    assert breaches(limits, window([40.0] * 4, items=10, cached=5), CALM) == []
    # Requests that all failed answered no items: no ratio to judge.
    assert breaches(limits, window([40.0] * 4, items=0, errors=0), CALM) == []


def test_a_window_with_too_few_requests_breaches_no_rate_threshold():
    terrible = window([5000.0] * 4, errors=4, items=4, cached=0)
    limits = Thresholds(min_requests=5, p99_latency_ms=100, min_cache_hit_ratio=0.9)
    assert breaches(limits, terrible, CALM) == []
    assert names(breaches(limits.model_copy(update={"min_requests": 4}), terrible, CALM)) == [
        "p95_latency_ms",
        "p99_latency_ms",
        "error_rate",
        "min_cache_hit_ratio",
    ]


def test_an_empty_window_breaches_only_through_its_queues():
    empty = window([])
    assert breaches(Thresholds(min_requests=1), empty, CALM) == []
    assert breaches(Thresholds(), empty, {"generator": 101, "classifier": 3}) == [Breach("max_queue_depth", 100, 101)]


def test_the_deepest_queue_is_judged():
    limits = Thresholds(max_queue_depth=10)
    assert breaches(limits, window([40.0]), {"a": 3, "b": 11, "c": 10}) == [Breach("max_queue_depth", 10, 11)]
    assert breaches(limits, window([40.0]), {"a": 3, "b": 10}) == []
    assert breaches(limits, window([40.0]), {}) == []
    assert names(breaches(Thresholds(max_queue_depth=0), window([40.0]), {"a": 1})) == ["max_queue_depth"]


def test_none_turns_each_threshold_off():
    off = Thresholds(p95_latency_ms=None, p99_latency_ms=None, error_rate=None, max_queue_depth=None)
    assert breaches(off, window([5000.0] * 20, errors=20), {"generator": 10_000}) == []


def test_breaches_describe_themselves_above_or_below_their_limit():
    slow, cold = Breach("p95_latency_ms", 1000.0, 1234.5678), Breach("min_cache_hit_ratio", 0.5, 0.25)
    assert slow.describe() == "p95_latency_ms: 1235 is above the limit 1000"
    assert cold.describe() == "min_cache_hit_ratio: 0.25 is below the limit 0.5"
    assert cold.as_dict() == {
        "threshold": "min_cache_hit_ratio",
        "limit": 0.5,
        "value": 0.25,
        "description": cold.describe(),
    }


@pytest.mark.parametrize(
    "values",
    [
        {"p95_latency_ms": 0},
        {"p99_latency_ms": -1},
        {"error_rate": 1.5},
        {"min_cache_hit_ratio": -0.1},
        {"max_queue_depth": -1},
        {"min_requests": 0},
        {"min_requests": None},
        {"p50_latency_ms": 100},
    ],
)
def test_nonsense_thresholds_are_refused(values):
    with pytest.raises(ValidationError):
        Thresholds.model_validate(values)


@pytest.fixture
async def sessions(database_url: str):
    await asyncio.to_thread(migrate.upgrade, database_url)
    engine = create_engine(database_url, timeout_s=5)
    yield session_factory(engine)
    await engine.dispose()


async def test_stored_thresholds_are_loaded_back_and_every_store_is_audited(sessions):
    assert await load(sessions) == Thresholds()
    assert await audit_trail(sessions) == []

    first = await store(sessions, Thresholds(p95_latency_ms=200, max_queue_depth=None), "key-1", "acme")
    assert first == {"p95_latency_ms": [1000.0, 200.0], "max_queue_depth": [100, None]}
    second = await store(sessions, Thresholds(p95_latency_ms=200, error_rate=0.1), "key-2", "acme")
    assert second == {"error_rate": [0.05, 0.1], "max_queue_depth": [None, 100]}
    assert await load(sessions) == Thresholds(p95_latency_ms=200, error_rate=0.1)
    # Storing the same values again changes nothing, and is still on the record.
    assert await store(sessions, Thresholds(p95_latency_ms=200, error_rate=0.1), None, "other") == {}

    trail = await audit_trail(sessions)
    assert [(entry["key_id"], entry["tenant"], entry["changes"]) for entry in trail] == [
        (None, "other", {}),
        ("key-2", "acme", second),
        ("key-1", "acme", first),
    ]
    assert [entry["key_id"] for entry in await audit_trail(sessions, limit=2)] == [None, "key-2"]

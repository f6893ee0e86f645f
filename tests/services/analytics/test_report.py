"""The report's retry policy, quota, cache and fallback, against the fake Gemini server (counts from its log)."""

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from tenacity import RetryCallState

from server.core.rate_policy import parse_policies
from server.db import migrate
from server.db.analytics_models import RequestRecord
from server.db.session import create_engine, session_factory
from server.providers.base import ProviderError
from server.providers.gemini_report import GeminiJson
from server.services.analytics import thresholds
from server.services.analytics.report import PerformanceReports
from server.services.cache import MemoryStore, ResponseCache
from server.services.limits.egress import EgressGuard
from server.services.limits.gcra import MemoryLimiter
from server.services.records import RecordWriter
from tests.services.analytics.test_aggregate import BASE, request

GENERATE = r"/v1beta/models/[^/]+:generateContent"
WINDOW = (BASE, BASE + timedelta(hours=1))


@pytest.fixture
async def sessions(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'reports.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    engine = create_engine(url, timeout_s=5)
    sessions = session_factory(engine)
    writer = RecordWriter(sessions, database_url=url, flush_interval_s=60, max_items=1000, spill_dir=tmp_path / "spill")
    # 20 requests of 3 s, 5 of them failed: p95 and the error rate breach the default thresholds.
    writer.add(RequestRecord, [request(i, 3000.0, status=500 if i < 5 else 200) for i in range(20)])
    assert await writer.flush()
    yield sessions
    await engine.dispose()


def reports(
    sessions, fake=None, *, quota: str = "gemini=100/minute", timeout_s: float = 10.0, max_wait_s: float = 2.0
) -> PerformanceReports:
    gemini = GeminiJson("key", "gemini-2.5-flash-lite", timeout_s=timeout_s, base_url=fake.base_url) if fake else None
    cache = ResponseCache(MemoryStore(max_items=100, ttl_s=300), lock_ttl_s=30)
    egress = EgressGuard(MemoryLimiter(), parse_policies(quota), fail_open=True)
    return PerformanceReports(
        sessions,
        cache,
        egress,
        gemini,
        "gemini-2.5-flash-lite",
        lambda: {"generator": 0.0},
        max_wait_s=max_wait_s,
        backoff_s=0.001,
    )


async def test_without_a_key_every_breach_is_a_finding_with_a_recommendation(sessions):
    report = await reports(sessions).analyze(*WINDOW)
    assert (report["source"], report["reason"], report["severity"]) == ("fallback", "no_key", "critical")
    assert {b["threshold"] for b in report["breaches"]} == {"p95_latency_ms", "error_rate"}
    assert len(report["findings"]) == len(report["recommendations"]) == 2
    assert report["metrics"]["requests"] == 20 and report["metrics"]["error_rate"] == 0.25


async def test_within_thresholds_the_fallback_says_so(sessions):
    await thresholds.store(sessions, thresholds.Thresholds(p95_latency_ms=5000, error_rate=0.5), "key:admin", "admin")
    report = await reports(sessions).analyze(*WINDOW)
    assert (report["severity"], report["breaches"], report["recommendations"]) == ("ok", [], [])


async def test_a_gemini_report_is_cached(sessions, fake_gemini):
    service = reports(sessions, fake_gemini)
    first = await service.analyze(*WINDOW)
    second = await service.analyze(*WINDOW)
    assert (first["source"], first["cached"], second["cached"]) == ("gemini", False, True)
    assert second["summary"] == first["summary"] and second["generated_at"] == first["generated_at"]
    assert len(fake_gemini.calls("POST", GENERATE)) == 1
    await service.analyze(*WINDOW, focus="latency")  # another report: asked again
    assert len(fake_gemini.calls("POST", GENERATE)) == 2


async def test_503_twice_then_success_takes_three_calls(sessions, fake_gemini):
    fake_gemini.settings.generate_503s = 2
    report = await reports(sessions, fake_gemini).analyze(*WINDOW)
    assert report["source"] == "gemini"
    assert len(fake_gemini.calls("POST", GENERATE)) == 3


async def test_429_is_retried(sessions, fake_gemini):
    fake_gemini.settings.generate_429s = 1
    fake_gemini.settings.retry_after_s = 0.05
    report = await reports(sessions, fake_gemini).analyze(*WINDOW)
    assert report["source"] == "gemini" and len(fake_gemini.calls("POST", GENERATE)) == 2


def waits(service: PerformanceReports, error: Exception) -> list[float]:
    """The waits before the 2nd, 3rd and 4th attempts after `error`."""
    found = []
    for attempt in (1, 2, 3):
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        state.set_exception((type(error), error, None))
        found.append(service._backoff(state))
    return found


def test_backoff_doubles_with_jitter_and_honours_retry_after(sessions):
    service = reports(sessions)
    service.backoff_s = 1.0
    for _ in range(20):
        first, second, third = waits(service, ProviderError("gemini", "call", "503", status=503))
        assert 1 <= first <= 2 and 2 <= second <= 4 and 4 <= third <= 8
    assert min(waits(service, ProviderError("gemini", "call", "429", status=429, retry_after_s=10))) == 10


async def test_a_retry_after_beyond_the_max_wait_is_not_waited_for(sessions, fake_gemini):
    fake_gemini.settings.generate_429s = 1
    fake_gemini.settings.retry_after_s = 60
    report = await reports(sessions, fake_gemini, max_wait_s=1).analyze(*WINDOW)
    assert (report["source"], report["reason"]) == ("fallback", "unavailable")
    assert len(fake_gemini.calls("POST", GENERATE)) == 1


async def test_at_most_four_attempts_then_the_fallback(sessions, fake_gemini):
    fake_gemini.settings.generate_503s = 10
    service = reports(sessions, fake_gemini)
    report = await service.analyze(*WINDOW)
    assert (report["source"], report["reason"]) == ("fallback", "unavailable")
    assert len(fake_gemini.calls("POST", GENERATE)) == 4
    fake_gemini.settings.generate_503s = 0  # a fallback is not cached: the next request asks again
    assert (await service.analyze(*WINDOW))["source"] == "gemini"


async def test_hangs_past_the_timeout_are_retried_then_fall_back(sessions, fake_gemini):
    fake_gemini.settings.generate_hangs = 4
    fake_gemini.settings.hang_s = 30
    report = await reports(sessions, fake_gemini, timeout_s=0.2).analyze(*WINDOW)
    assert (report["source"], report["reason"]) == ("fallback", "timeout")
    assert len(fake_gemini.calls("POST", GENERATE)) == 4


async def test_an_answer_breaking_the_schema_is_not_retried(sessions, fake_gemini):
    fake_gemini.settings.generate_bad_json = 1
    report = await reports(sessions, fake_gemini).analyze(*WINDOW)
    assert (report["source"], report["reason"]) == ("fallback", "invalid_answer")
    assert len(fake_gemini.calls("POST", GENERATE)) == 1


async def test_the_third_distinct_report_over_a_quota_of_two_falls_back(sessions, fake_gemini):
    service = reports(sessions, fake_gemini, quota="gemini=2/minute")
    answers = [await service.analyze(*WINDOW, focus=focus) for focus in ("errors", "latency", "cache")]
    assert [a["source"] for a in answers] == ["gemini", "gemini", "fallback"]
    assert answers[2]["reason"] == "quota"
    assert len(fake_gemini.calls("POST", GENERATE)) == 2
    assert (await service.analyze(*WINDOW, focus="errors"))["cached"] is True  # from the cache despite the quota


class Surprising:
    """A report client whose call fails in a way no retry policy names."""

    async def generate(self, prompt, schema):
        raise ValueError("an SDK surprise")


async def test_an_unexpected_failure_still_answers_with_the_fallback(sessions):
    service = reports(sessions)
    service.gemini = Surprising()
    report = await service.analyze(*WINDOW)
    assert (report["source"], report["reason"]) == ("fallback", "error")

"""The performance report: Gemini's reading of the serving metrics, or a rule-based one when Gemini cannot answer.

`PerformanceReports.analyze` measures the window (rollups), loads the thresholds, finds the breaches, then:
- without a Gemini key: the rule-based report (`source: "fallback"`, reason `no_key`);
- else through the report cache (`ResponseCache`, so Redis's stampede lock makes concurrent identical requests of
  every replica share one Gemini call), keyed by the window and a digest of the metrics, thresholds and focus.
  On a miss Gemini is asked: each attempt first takes one call from the egress guard's `gemini` quota, waiting at
  most `max_wait_s`; transient failures (429, 500, 503, 504, no answer within the per-call timeout) are retried,
  at most `attempts` in all, after `backoff_s * 2**n * (1 + jitter)` seconds (1-2, 2-4, 4-8 s by default) or the
  server's Retry-After if longer; a Retry-After beyond `max_wait_s` is not waited for. An answer that does not fit
  the schema is not retried. If it all fails, the rule-based report with the reason (`quota`, `timeout`,
  `unavailable`, `invalid_answer`, `error`: anything else), not cached, so the next request asks again.
Every breach becomes a finding with a recommendation in the rule-based report.
"""

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from server.core import clock, metrics
from server.core.tenants import DEFAULT_TENANT
from server.providers.base import ProviderError
from server.providers.gemini_report import GeminiJson, InvalidAnswer
from server.services.analytics import thresholds as threshold_store
from server.services.analytics.aggregate import Stats, aggregate
from server.services.analytics.thresholds import Breach, breaches
from server.services.cache import SERVED_FROM_CACHE, ResponseCache
from server.services.cache.keys import cache_key
from server.services.limits.egress import EgressGuard, EgressLimited

log = logging.getLogger(__name__)
PROVIDER = "gemini"
TRANSIENT_STATUS = frozenset({429, 500, 503, 504})
Severity = Literal["ok", "warning", "critical"]
REPORT_VERSION = "report-1"  # part of the cache key: a new prompt or schema never serves old reports


class Finding(BaseModel):
    title: str = Field(description="one line")
    detail: str = Field(description="what the metrics show, with numbers")
    severity: Severity


class ReportBody(BaseModel):
    """What Gemini writes (its response schema)."""

    summary: str = Field(description="two or three sentences on how the server is doing")
    severity: Severity = Field(description="ok: no threshold breached; critical: errors or far beyond a threshold")
    findings: list[Finding]
    recommendations: list[str] = Field(description="concrete actions, most important first")


class ReportFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


RECOMMENDATIONS = {
    "p95_latency_ms": "Latency is high: check scheduler_queue_wait_seconds and model_batch_seconds; add replicas or "
    "lower SCHEDULER_MAX_SIZE if batches are slow, raise CACHE_TTL_S if repeats are common.",
    "p99_latency_ms": "Tail latency is high: look for long generations (max_new_tokens) sharing batches, and for "
    'cache stampedes (cache_requests_total{result="error"}).',
    "error_rate": "Requests are failing: group the failures by status in the request records; 503s mean the "
    "queue is full (raise SCHEDULER_QUEUE_LIMIT or add replicas), 504s mean REQUEST_TIMEOUT_S is too short "
    "for the load, 500s point at the model.",
    "min_cache_hit_ratio": "Few answers come from the cache: check that clients send deterministic requests "
    "(greedy or seeded) and that CACHE_TTL_S and CACHE_MAX_ITEMS are large enough.",
    "max_queue_depth": "The model queue is deep: add replicas or lower the ingress rate limit before requests "
    "start failing with 503.",
}


def _severity(found: list[Breach]) -> Severity:
    if not found:
        return "ok"
    critical = any(
        b.threshold == "error_rate" or (b.limit and b.value > 2 * b.limit and not b.threshold.startswith("min_"))
        for b in found
    )
    return "critical" if critical else "warning"


def rule_based(stats: Stats, found: list[Breach]) -> ReportBody:
    """Every breach is a finding with its recommendation; no breach, one finding saying so."""
    summary = stats.summary()
    p95 = summary["latency_ms"]["p95"]
    overview = (
        f"{stats.requests} requests ({stats.items} items) between {stats.start:%Y-%m-%d %H:%M} and "
        f"{stats.end:%Y-%m-%d %H:%M} UTC; error rate {summary['error_rate']:.1%}, cache hit ratio "
        f"{summary['cache_hit_ratio']:.1%}, p95 latency {'n/a' if p95 is None else f'{p95:g} ms'}."
    )
    severity = _severity(found)
    if not found:
        return ReportBody(
            summary=f"{overview} Every threshold is met.",
            severity="ok",
            findings=[Finding(title="Within thresholds", detail=overview, severity="ok")],
            recommendations=[],
        )
    findings = [
        Finding(
            title=f"{b.threshold} breached",
            detail=b.describe(),
            severity="critical" if _severity([b]) == "critical" else "warning",
        )
        for b in found
    ]
    return ReportBody(
        summary=f"{overview} {len(found)} threshold(s) breached.",
        severity=severity,
        findings=findings,
        recommendations=[RECOMMENDATIONS[b.threshold] for b in found],
    )


def _prompt(window: dict, found: list[Breach], focus: str | None) -> str:
    return (
        "You are the site reliability engineer of a model inference server (GPT-2 /generate and sentiment "
        "/predict, micro-batched, cached). Write a performance report for the window below: a summary, "
        "findings with numbers from the data, and concrete recommendations. Thresholds breached are listed; "
        "severity is ok only if none is.\n"
        + (f"Focus on: {focus}\n" if focus else "")
        + f"Data (JSON): {json.dumps(window, default=str, sort_keys=True)}\n"
        + f"Breaches: {json.dumps([b.describe() for b in found])}"
    )


@dataclass
class PerformanceReports:
    sessions: async_sessionmaker[AsyncSession]
    cache: ResponseCache
    egress: EgressGuard
    gemini: GeminiJson | None
    model: str
    queue_depths: Callable[[], dict[str, float]]
    max_wait_s: float = 2.0
    attempts: int = 4
    backoff_s: float = 1.0

    async def analyze(
        self,
        start: datetime,
        end: datetime,
        focus: str | None = None,
        *,
        tenant: str | None = None,
        caller: str = DEFAULT_TENANT,
    ) -> dict:
        """The report on `tenant`'s requests (None: every tenant's) in `[start, end)` (one-minute resolution):
        always an answer, from Gemini or the rules. Gemini's calls count against `caller`'s egress quota, and its
        report is cached in `caller`'s cache scope."""
        window = await aggregate(self.sessions, start, end, "hour", tenant=tenant)
        limits = await threshold_store.load(self.sessions)
        found = breaches(limits, window.total, self.queue_depths())
        measured = window.total.summary()
        data = {
            "total": measured,
            "hours": [bucket.summary() for bucket in window.buckets[-48:]],
            "thresholds": limits.model_dump(),
        }
        answer = {
            "model": self.model,
            "metrics": measured,
            "thresholds": limits.model_dump(),
            "breaches": [b.as_dict() for b in found],
        }
        if self.gemini is None:
            return self._fallback(answer, window.total, found, "no_key")
        measured_and_breached = {"data": data, "breaches": [b.describe() for b in found]}
        digest = hashlib.sha256(json.dumps(measured_and_breached, default=str, sort_keys=True).encode()).hexdigest()
        key = cache_key(
            "analyze",
            self.model,
            REPORT_VERSION,
            digest,
            {"focus": focus or "", "tenant": tenant},
            self.cache.scope(caller),
        )

        async def write(_: int) -> bytes:
            body = await self._ask(_prompt(data, found, focus), caller)
            return json.dumps({"report": body.model_dump(), "generated_at": clock.now().isoformat()}).encode()

        try:
            [(value, outcome)] = await self.cache.resolve("analyze", [key], write)
        except ReportFailed as exc:
            return self._fallback(answer, window.total, found, exc.reason)
        stored = json.loads(value)
        metrics.ANALYZE_REPORTS.labels("gemini", "none").inc()
        return (
            answer
            | stored["report"]
            | {
                "source": "gemini",
                "reason": None,
                "generated_at": stored["generated_at"],
                "cached": outcome in SERVED_FROM_CACHE,
            }
        )

    def _fallback(self, answer: dict, stats: Stats, found: list[Breach], reason: str) -> dict:
        metrics.ANALYZE_REPORTS.labels("fallback", reason).inc()
        return (
            answer
            | rule_based(stats, found).model_dump()
            | {"source": "fallback", "reason": reason, "generated_at": clock.now().isoformat(), "cached": False}
        )

    def _backoff(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        floor = exc.retry_after_s if isinstance(exc, ProviderError) and exc.retry_after_s else 0.0
        return max(floor, self.backoff_s * 2 ** (state.attempt_number - 1) * (1 + random.random()))

    def _give_up(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        too_long = isinstance(exc, ProviderError) and (exc.retry_after_s or 0.0) > self.max_wait_s
        return too_long or stop_after_attempt(self.attempts)(state)

    async def _ask(self, prompt: str, tenant: str) -> ReportBody:
        """Gemini's report, under the quota and the retry policy; `ReportFailed` with the reason otherwise."""
        retrying = AsyncRetrying(
            stop=self._give_up, wait=self._backoff, reraise=True, retry=retry_if_exception(_transient)
        )
        try:
            return await retrying(self._attempt, prompt, tenant)
        except EgressLimited as exc:
            metrics.GEMINI_CALLS.labels("quota").inc()
            raise ReportFailed("quota") from exc
        except ProviderError as exc:
            raise ReportFailed(
                _outcome(exc) if isinstance(exc, InvalidAnswer) or exc.status is None else "unavailable"
            ) from exc
        except Exception as exc:  # an SDK surprise still gets the report its fallback, and a traceback in the log
            log.exception("the Gemini report call failed unexpectedly")
            metrics.GEMINI_CALLS.labels("error").inc()
            raise ReportFailed("error") from exc

    async def _attempt(self, prompt: str, tenant: str) -> ReportBody:
        if self.gemini is None:
            raise RuntimeError("no Gemini client: reports without a key fall back before asking")
        await self.egress.acquire(PROVIDER, tenant=tenant, wait_s=self.max_wait_s)
        try:
            body = await self.gemini.generate(prompt, ReportBody)
        except ProviderError as exc:
            metrics.GEMINI_CALLS.labels(_outcome(exc)).inc()
            raise
        metrics.GEMINI_CALLS.labels("ok").inc()
        return body


def _transient(exc: BaseException) -> bool:
    return (
        isinstance(exc, ProviderError)
        and not isinstance(exc, InvalidAnswer)
        and (exc.status is None or exc.status in TRANSIENT_STATUS)
    )


def _outcome(exc: ProviderError) -> str:
    if isinstance(exc, InvalidAnswer):
        return "invalid_answer"
    return "timeout" if exc.status is None else f"http_{exc.status}"

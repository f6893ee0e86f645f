"""Bodies and answers of the analytics, report and cache administration routes."""

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from server.services.analytics.report import Finding, Severity
from server.services.analytics.thresholds import Thresholds

Endpoint = Literal["generate", "predict"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Window(_Strict):
    @model_validator(mode="after")
    def _ordered(self):
        start, end = getattr(self, "start", None), getattr(self, "end", None)
        if start is not None and end is not None and end <= start:
            raise ValueError("end must be after start")
        return self


class CountOut(BaseModel):
    predictions: int
    generations: int
    total: int


class AggregatedIn(_Window):
    start: AwareDatetime
    end: AwareDatetime
    bucket: Literal["minute", "hour", "day"] = "hour"
    endpoint: Endpoint | None = None
    model: str | None = Field(None, max_length=255)


class LatencyOut(BaseModel):
    p50: float | None = Field(description="ms, upper bound of its histogram bucket")
    p95: float | None
    p99: float | None
    mean: float | None
    max: float | None


class StatsOut(BaseModel):
    start: datetime
    end: datetime
    requests: int
    items: int
    errors: int
    error_rate: float
    cache_hit_ratio: float = Field(description="items answered from the cache / items answered")
    latency_ms: LatencyOut
    tokens_in: int
    tokens_out: int
    throughput_rps: float = Field(description="requests per second over the bucket")
    items_per_s: float


class BreachOut(BaseModel):
    threshold: str
    limit: float
    value: float
    description: str


class ModelLiveOut(BaseModel):
    queue_depth: int = Field(description="items waiting for a batch now")
    batches: int
    items: int = Field(description="items computed (after de-duplication)")
    mean_batch_size: float | None = Field(description="items / batches; null before the first batch")


class PolicyUseOut(BaseModel):
    name: str = Field(description="the policy (ingress: `default` or a route group; egress: the provider)")
    count: int
    period_s: int
    burst: int
    allowed: int
    denied: int = Field(description="requests refused (429) or calls held back while this policy applied")


class LiveOut(BaseModel):
    """This process since it started, whatever the window (other replicas have their own)."""

    models: dict[str, ModelLiveOut]
    ingress: list[PolicyUseOut] = Field(description="per-client limits (INGRESS_RATE_LIMIT*); empty: off")
    egress: list[PolicyUseOut] = Field(description="per-provider quotas (EGRESS_RATE_LIMIT); empty: none")


class AggregatedOut(BaseModel):
    buckets: list[StatsOut] = Field(description="buckets with requests, oldest first")
    total: StatsOut
    breaches: list[BreachOut]
    live: LiveOut | None = Field(description="this process's figures over every tenant: admin keys only (else null)")


class ThresholdsOut(Thresholds):
    updated: list[str] = Field(default_factory=list, description="(PUT) fields this change altered")


class AnalyzeIn(_Window):
    start: AwareDatetime | None = Field(None, description="default: one hour before `end`")
    end: AwareDatetime | None = Field(None, description="default: the start of the current minute")
    focus: str | None = Field(None, max_length=500, description="what the report should look at first")


class ReportOut(BaseModel):
    source: Literal["gemini", "fallback"]
    reason: str | None = Field(description="why a fallback: no_key, quota, timeout, unavailable, invalid_answer, error")
    model: str
    summary: str
    severity: Severity
    findings: list[Finding]
    recommendations: list[str]
    metrics: StatsOut
    thresholds: Thresholds
    breaches: list[BreachOut]
    generated_at: datetime
    cached: bool


class CacheOut(BaseModel):
    entries: int = Field(description="cached answers in the store (every replica's on Redis)")
    backend: Literal["memory", "redis"]
    hit_ratio: float | None = Field(description="this process: items served without computing / cacheable items")


class CacheRemovedOut(BaseModel):
    removed: int

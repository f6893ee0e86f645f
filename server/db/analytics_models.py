"""Tables of the serving analytics: one row per /generate or /predict request, per-minute rollups of those
rows (what queries read), and the alert thresholds with their audit trail."""

from datetime import datetime

from sqlalchemy import JSON, Column, DateTime, Float, Integer, String, Table
from sqlalchemy.orm import Mapped, mapped_column

from server.core.tenants import DEFAULT_TENANT
from server.db.models import Base

# Upper bounds (ms) of the rollups' latency histogram; a last bucket takes everything above 30 s. Percentiles read
# from it are exact to one bucket: at most 5 ms off below 10 ms, then within 10-50% of the value.
LATENCY_BOUNDS_MS = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000)
HISTOGRAM_COLUMNS = tuple(f"h{index:02d}" for index in range(len(LATENCY_BOUNDS_MS) + 1))
# Rollup columns summed when rows of one (tenant, minute, endpoint, model) meet.
ADDITIVE_COLUMNS = (
    "requests",
    "items",
    "errors",
    "cached_items",
    "tokens_in",
    "tokens_out",
    "latency_sum_ms",
    *HISTOGRAM_COLUMNS,
)


class RequestRecord(Base):
    """One answered /generate or /predict request, failed ones included (`status` >= 400, `error` its kind)."""

    __tablename__ = "requests"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    endpoint: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(255))
    status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    items: Mapped[int] = mapped_column(Integer)
    cached_items: Mapped[int] = mapped_column(Integer)
    tokens_in: Mapped[int] = mapped_column(Integer)
    tokens_out: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


def _rollup_columns() -> list[Column]:
    counters = [
        Column(name, Integer, nullable=False, default=0) for name in ADDITIVE_COLUMNS if name != "latency_sum_ms"
    ]
    return [
        Column("tenant", String(64), primary_key=True),
        Column("minute", Integer, primary_key=True),
        Column("endpoint", String(16), primary_key=True),
        Column("model", String(255), primary_key=True),
        *counters,
        Column("latency_sum_ms", Float, nullable=False, default=0.0),
        Column("latency_max_ms", Float, nullable=False, default=0.0),
    ]


class MetricRollup(Base):
    """Requests of one tenant, minute (`minute`: minutes since the Unix epoch, UTC), endpoint and model: counts, tokens
    and the latency histogram (`hNN`: requests whose latency fell in bucket NN of LATENCY_BOUNDS_MS)."""

    __table__ = Table("metric_rollups", Base.metadata, *_rollup_columns())


class ThresholdSetting(Base):
    """The alert thresholds, shared by every replica (one row, `name` "default")."""

    __tablename__ = "analytics_thresholds"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    values: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ThresholdAudit(Base):
    """Who changed which thresholds, when: `key_id` is the API key's id (never the key), `changes` maps each changed
    field to `[old, new]`."""

    __tablename__ = "analytics_threshold_audit"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    changes: Mapped[dict] = mapped_column(JSON)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

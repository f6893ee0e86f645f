"""Alert thresholds: what "doing badly" means, stored in the database (shared by replicas), every change audited."""

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.db.analytics_models import ThresholdAudit, ThresholdSetting
from server.services.analytics.aggregate import Stats

ROW = "default"


class Thresholds(BaseModel):
    """A window breaches a threshold when its value is beyond it; `None` turns a threshold off."""

    model_config = ConfigDict(extra="forbid")

    p95_latency_ms: float | None = Field(1000.0, gt=0, description="highest acceptable p95 latency")
    p99_latency_ms: float | None = Field(None, gt=0, description="highest acceptable p99 latency")
    error_rate: float | None = Field(0.05, ge=0, le=1, description="highest acceptable share of failed requests")
    min_cache_hit_ratio: float | None = Field(
        None, ge=0, le=1, description="lowest acceptable share of items answered from the cache"
    )
    max_queue_depth: int | None = Field(100, ge=0, description="most items acceptable in a model's queue now")
    min_requests: int = Field(1, ge=1, description="windows with fewer requests breach no rate threshold")


@dataclass(frozen=True)
class Breach:
    threshold: str
    limit: float
    value: float

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "limit": self.limit, "value": self.value, "description": self.describe()}

    def describe(self) -> str:
        above = not self.threshold.startswith("min_")
        return f"{self.threshold}: {self.value:.4g} is {'above' if above else 'below'} the limit {self.limit:.4g}"


def breaches(thresholds: Thresholds, stats: Stats, queue_depths: dict[str, float]) -> list[Breach]:
    """Every threshold the window (and the queues now) violate."""
    found = []
    summary = stats.summary()
    if stats.requests >= thresholds.min_requests:
        measured = {
            "p95_latency_ms": summary["latency_ms"]["p95"],
            "p99_latency_ms": summary["latency_ms"]["p99"],
            "error_rate": summary["error_rate"],
        }
        for name, value in measured.items():
            limit = getattr(thresholds, name)
            if limit is not None and value is not None and value > limit:
                found.append(Breach(name, limit, value))
        if (
            thresholds.min_cache_hit_ratio is not None
            and stats.items
            and summary["cache_hit_ratio"] < thresholds.min_cache_hit_ratio
        ):
            found.append(Breach("min_cache_hit_ratio", thresholds.min_cache_hit_ratio, summary["cache_hit_ratio"]))
    deepest = max(queue_depths.values(), default=0.0)
    if thresholds.max_queue_depth is not None and deepest > thresholds.max_queue_depth:
        found.append(Breach("max_queue_depth", thresholds.max_queue_depth, deepest))
    return found


async def load(sessions: async_sessionmaker[AsyncSession]) -> Thresholds:
    """The stored thresholds; the defaults until someone sets them."""
    async with sessions() as session:
        stored = await session.scalar(select(ThresholdSetting.values).where(ThresholdSetting.name == ROW))
    return Thresholds.model_validate(stored) if stored else Thresholds()


async def store(
    sessions: async_sessionmaker[AsyncSession], thresholds: Thresholds, key_id: str | None, tenant: str
) -> dict[str, list]:
    """Replace the thresholds; the audit row (same transaction) names the key id, its tenant and each change as
    [old, new]."""
    now = clock.now()
    async with sessions() as session, session.begin():
        row = await session.get(ThresholdSetting, ROW, with_for_update=True)
        old = Thresholds.model_validate(row.values) if row else Thresholds()
        new_values = thresholds.model_dump()
        changes = {
            name: [value, new_values[name]] for name, value in old.model_dump().items() if value != new_values[name]
        }
        if row is None:
            session.add(ThresholdSetting(name=ROW, values=new_values, updated_at=now, updated_by=key_id))
        else:
            row.values, row.updated_at, row.updated_by = new_values, now, key_id
        session.add(ThresholdAudit(tenant=tenant, key_id=key_id, changes=changes, changed_at=now))
    return changes


async def audit_trail(sessions: async_sessionmaker[AsyncSession], limit: int = 20) -> list[dict]:
    """The latest changes, newest first."""
    async with sessions() as session:
        rows = (await session.scalars(select(ThresholdAudit).order_by(ThresholdAudit.pk.desc()).limit(limit))).all()
    return [
        {"tenant": row.tenant, "key_id": row.key_id, "changes": row.changes, "changed_at": row.changed_at}
        for row in rows
    ]

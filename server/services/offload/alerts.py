"""Batch alerts, from the seed design, with configurable thresholds:

- `failure_rate` (warning): more than `failure_rate` of the jobs that finished in the last 24 h failed;
- `long_running` (warning): a provider batch (or a local job) has been in flight for over `max_age_h` hours;
- `queue_backlog` (info): more than `max_queued_items` items wait to be submitted;
- `savings_milestone` (info): total savings passed another multiple of `savings_step_usd`.

`evaluate()` says which are active now. `update()` (run by the worker, so once across replicas) also stores
each alert's state, so an alert is logged and posted to `ALERT_WEBHOOK_URL` once when it starts (for the
savings milestone: once per new multiple), and sets `batch_alerts_active{type}`.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock, metrics
from server.core.provider_names import LOCAL
from server.db.batch_models import BatchAlert, BatchItem, BatchJob, ProviderBatch
from server.services.offload.webhooks import Webhooks

log = logging.getLogger(__name__)
ALERT_TYPES = ("failure_rate", "long_running", "queue_backlog", "savings_milestone")


@dataclass(frozen=True)
class Thresholds:
    failure_rate: float = 0.10
    max_age_h: float = 48.0
    max_queued_items: int = 10_000
    savings_step_usd: float = 1000.0


@dataclass(frozen=True)
class Alert:
    type: str
    severity: str
    message: str
    level: int = 0


class BatchAlerts:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        thresholds: Thresholds,
        *,
        webhooks: Webhooks | None = None,
        webhook_url: str | None = None,
    ):
        self.sessions = sessions
        self.thresholds = thresholds
        self.webhooks = webhooks
        self.webhook_url = webhook_url

    async def evaluate(self) -> list[Alert]:
        limits = self.thresholds
        now = clock.now()
        old = now - timedelta(hours=limits.max_age_h)
        async with self.sessions() as session:
            finished = dict(
                (
                    await session.execute(
                        select(BatchJob.status, func.count())
                        .where(BatchJob.completed_at >= now - timedelta(hours=24))
                        .group_by(BatchJob.status)
                    )
                ).all()
            )
            stuck = await session.scalar(
                select(func.count())
                .select_from(ProviderBatch)
                .where(
                    ProviderBatch.status.not_in(("fetched", "completed", "failed", "expired", "cancelled")),
                    ProviderBatch.created_at < old,
                )
            )
            stuck_local = await session.scalar(
                select(func.count())
                .select_from(BatchJob)
                .where(BatchJob.provider == LOCAL, BatchJob.status == "in_progress", BatchJob.submitted_at < old)
            )
            queued = await session.scalar(
                select(func.count()).select_from(BatchItem).where(BatchItem.status == "queued")
            )
            saved = await session.scalar(select(func.coalesce(func.sum(BatchJob.savings_usd), 0.0)))
        alerts = []
        total = sum(finished.values())
        if total and finished.get("failed", 0) / total > limits.failure_rate:
            alerts.append(
                Alert(
                    "failure_rate",
                    "warning",
                    f"{finished['failed']} of {total} batch jobs finished in "
                    f"the last 24 h failed (threshold {limits.failure_rate:.0%})",
                )
            )
        if stuck or stuck_local:
            alerts.append(
                Alert(
                    "long_running",
                    "warning",
                    f"{(stuck or 0) + (stuck_local or 0)} batch(es) in flight for over {limits.max_age_h:g} h",
                )
            )
        if (queued or 0) > limits.max_queued_items:
            alerts.append(
                Alert(
                    "queue_backlog",
                    "info",
                    f"{queued} batch items are waiting to be submitted (threshold {limits.max_queued_items})",
                )
            )
        saved_usd = float(saved or 0)
        level = int(saved_usd // limits.savings_step_usd)
        if level >= 1:
            alerts.append(
                Alert(
                    "savings_milestone",
                    "info",
                    f"batch offload has saved ${saved_usd:,.2f} (past ${level * limits.savings_step_usd:,.0f})",
                    level,
                )
            )
        return alerts

    async def update(self) -> list[Alert]:
        """Evaluate, store the states, and announce the alerts that started (or reached a new level)."""
        active = {alert.type: alert for alert in await self.evaluate()}
        started: list[Alert] = []
        now = clock.now()
        async with self.sessions() as session, session.begin():
            states = {row.type: row for row in (await session.scalars(select(BatchAlert))).all()}
            for kind in ALERT_TYPES:
                alert, state = active.get(kind), states.get(kind)
                metrics.BATCH_ALERTS_ACTIVE.labels(kind).set(1 if alert else 0)
                if alert is None:
                    if state is not None and state.active:
                        state.active = False
                    continue
                fresh = state is None or not state.active or alert.level > state.level
                if state is None:
                    session.add(
                        BatchAlert(
                            type=kind,
                            active=True,
                            severity=alert.severity,
                            message=alert.message,
                            since=now,
                            level=alert.level,
                        )
                    )
                else:
                    state.since = now if not state.active else state.since
                    state.active, state.severity, state.message = True, alert.severity, alert.message
                    state.level = max(state.level, alert.level)
                if fresh:
                    started.append(alert)
        for alert in started:
            log.log(
                logging.WARNING if alert.severity == "warning" else logging.INFO,
                "batch alert %s: %s",
                alert.type,
                alert.message,
            )
            if self.webhooks is not None and self.webhook_url:
                payload = {
                    "event": "batch.alert",
                    "type": alert.type,
                    "severity": alert.severity,
                    "message": alert.message,
                    "at": now.isoformat(),
                }
                self.webhooks.post_later(self.webhook_url, payload)
        return started

    async def states(self) -> dict[str, BatchAlert]:
        async with self.sessions() as session:
            return {row.type: row for row in (await session.scalars(select(BatchAlert))).all()}

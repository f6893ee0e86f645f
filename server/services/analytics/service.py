"""The analytics facade, what `/metrics/*` and `/analyze/performance` ask: counts and aggregates over every replica's
records (the database's rollups), the thresholds that define "doing badly" and what breaches them, this process's
live figures, and the performance report."""

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.services.analytics import thresholds as threshold_store
from server.services.analytics.aggregate import Aggregate, BucketSize, aggregate, count_items, default_window
from server.services.analytics.live import live_figures
from server.services.analytics.report import PerformanceReports
from server.services.analytics.thresholds import Breach, Thresholds, breaches
from server.services.errors import FieldError, InputError
from server.services.limits.egress import EgressGuard
from server.services.limits.ingress import IngressLimits
from server.services.scheduling.interface import Batcher

# A report without a window covers the last hour.
REPORT_SPAN = timedelta(hours=1)


class Analytics:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        reports: PerformanceReports,
        batchers: Mapping[str, Batcher[Any, Any]],
        ingress: IngressLimits,
        egress: EgressGuard,
    ):
        self.sessions = sessions
        self.reports = reports
        self.batchers = batchers
        self.ingress = ingress
        self.egress = egress

    async def count(
        self, *, since: datetime | None, until: datetime | None, model: str | None, tenant: str | None
    ) -> dict[str, int]:
        """Items answered per endpoint (`generate`, `predict`) in `[since, until)`, at one-minute resolution."""
        if since is not None and until is not None and since > until:
            raise InputError([FieldError(("query", "until"), "until is before since: the window would be empty")])
        return await count_items(self.sessions, since=since, until=until, model=model, tenant=tenant)

    async def aggregated(
        self,
        start: datetime,
        end: datetime,
        bucket: BucketSize,
        *,
        endpoint: str | None,
        model: str | None,
        tenant: str | None,
    ) -> tuple[Aggregate, list[Breach]]:
        """The window's figures per bucket and in total, and the thresholds its total breaches (with this process's
        queues)."""
        result = await aggregate(self.sessions, start, end, bucket, endpoint=endpoint, model=model, tenant=tenant)
        found = breaches(await self.thresholds(), result.total, self.reports.queue_depths())
        return result, found

    def live(self) -> dict:
        """This process's queues, batch sizes and rate-limit decisions, over every tenant."""
        return live_figures(self.batchers, self.ingress, self.egress)

    async def thresholds(self) -> Thresholds:
        return await threshold_store.load(self.sessions)

    async def set_thresholds(self, thresholds: Thresholds, key_id: str | None, tenant: str) -> dict[str, list]:
        """Replace the thresholds, audited under the key's id and tenant; each change as [old, new]."""
        return await threshold_store.store(self.sessions, thresholds, key_id, tenant)

    async def analyze(
        self, start: datetime | None, end: datetime | None, focus: str | None, *, tenant: str | None, caller: str
    ) -> dict:
        """The performance report on the window (by default the last complete hour)."""
        end = end or default_window(clock.now())[1]
        return await self.reports.analyze(start or end - REPORT_SPAN, end, focus, tenant=tenant, caller=caller)

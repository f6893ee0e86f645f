"""This process's live figures: per model from its scheduler, per configured policy from the limiter's
decisions. Policy and model names are unique per test: the Prometheus registry is shared by the whole test process."""

import uuid
from types import SimpleNamespace

from prometheus_client import REGISTRY

from server.core.rate_policy import parse_policy
from server.services.analytics.live import live_figures
from server.services.limits.egress import EgressGuard
from server.services.limits.gcra import MemoryLimiter
from server.services.limits.ingress import IngressLimits
from server.services.scheduling.interface import BatchSizes


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_each_configured_policy_counts_the_decisions_taken_under_it():
    limiter = MemoryLimiter()
    default, group = unique("default"), unique("predict")
    ingress = IngressLimits(
        limiter, parse_policy(default, "10/minute"), {group: parse_policy(group, "2/minute")}, fail_open=True
    )
    provider = unique("gemini")
    egress = EgressGuard(limiter, {provider: parse_policy(provider, "1/hour;burst=1")}, fail_open=True)
    for _ in range(3):
        await ingress.check(group, "ip:10.0.0.1")
    await ingress.check("generate", "ip:10.0.0.1")
    await egress.check(provider)
    await egress.check(provider)

    live = live_figures({}, ingress, egress)

    assert live["ingress"] == [
        # The third request to the group was refused while both policies applied: denied under both.
        {"name": default, "count": 10, "period_s": 60, "burst": 10, "allowed": 3, "denied": 1},
        {"name": group, "count": 2, "period_s": 60, "burst": 2, "allowed": 2, "denied": 1},
    ]
    assert live["egress"] == [{"name": provider, "count": 1, "period_s": 3600, "burst": 1, "allowed": 1, "denied": 1}]


def test_limits_that_are_off_are_empty_lists():
    limiter = MemoryLimiter()
    live = live_figures({}, IngressLimits(limiter, None, {}, fail_open=True), EgressGuard(limiter, {}, fail_open=True))
    assert live["ingress"] == [] and live["egress"] == []


def test_each_model_has_its_queue_and_its_mean_batch_size():
    """The figures come from the schedulers themselves; the sizes they record are observed as the metric too."""
    busy, idle = unique("generator"), unique("classifier")
    sizes = BatchSizes(busy)
    for size in (4, 2, 3):
        sizes.record(size)
    limiter = MemoryLimiter()

    live = live_figures(
        {busy: SimpleNamespace(queued=5, sizes=sizes), idle: SimpleNamespace(queued=0, sizes=BatchSizes(idle))},
        IngressLimits(limiter, None, {}, fail_open=True),
        EgressGuard(limiter, {}, fail_open=True),
    )

    assert live["models"] == {
        busy: {"queue_depth": 5, "batches": 3, "items": 9, "mean_batch_size": 3.0},
        idle: {"queue_depth": 0, "batches": 0, "items": 0, "mean_batch_size": None},
    }
    assert REGISTRY.get_sample_value("model_batch_size_sum", {"model": busy}) == 9

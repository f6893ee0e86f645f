"""This process's serving figures now, as JSON: the queues and batch sizes its schedulers report and the
rate-limit decisions it took (what `/metrics` holds as Prometheus text), for `POST /metrics/aggregated` and the
dashboard.

Counts run from this process's start and cover only this process: the database's rollups answer for every replica,
these are what the rollups do not hold (queues, batching, which policy refused a request, egress calls).
"""

from collections.abc import Mapping
from typing import Any

from server.core import metrics
from server.core.rate_policy import RatePolicy
from server.services.limits.egress import EgressGuard
from server.services.limits.ingress import IngressLimits
from server.services.scheduling.interface import Batcher


def _decisions(layer: str) -> dict[tuple[str, str], int]:
    """(policy, decision) -> rate-limit decisions of `layer` (`ingress`, `egress`) taken by this process."""
    return {
        (sample.labels["policy"], sample.labels["decision"]): int(sample.value)
        for metric in metrics.RATE_LIMIT_DECISIONS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["layer"] == layer
    }


def _uses(policies: list[RatePolicy], layer: str) -> list[dict]:
    counted = _decisions(layer)
    return [
        {
            "name": policy.name,
            "count": policy.count,
            "period_s": policy.period_s,
            "burst": policy.burst,
            "allowed": counted.get((policy.name, "allow"), 0),
            "denied": counted.get((policy.name, "deny"), 0),
        }
        for policy in policies
    ]


def _model(batcher: Batcher[Any, Any]) -> dict:
    batches, items = batcher.sizes.batches, batcher.sizes.items
    return {
        "queue_depth": batcher.queued,
        "batches": batches,
        "items": items,
        "mean_batch_size": items / batches if batches else None,
    }


def live_figures(batchers: Mapping[str, Batcher[Any, Any]], ingress: IngressLimits, egress: EgressGuard) -> dict:
    """Per model: items waiting now, batches run and items computed, and their mean batch size (None before the
    first batch). Per configured policy (ingress: per client, `INGRESS_RATE_LIMIT*`; egress: per provider,
    `EGRESS_RATE_LIMIT`): its quota and the decisions taken under it. A request refused while two ingress policies
    applied counts as denied under both (as in `rate_limit_decisions_total`). A layer without policies is an empty
    list: that limit is off."""
    ingress_policies = [policy for policy in (ingress.default, *ingress.groups.values()) if policy is not None]
    return {
        "models": {model: _model(batcher) for model, batcher in batchers.items()},
        "ingress": _uses(ingress_policies, "ingress"),
        "egress": _uses(list(egress.policies.values()), "egress"),
    }

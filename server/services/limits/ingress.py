"""Ingress limits: per client (API key, else client IP), per route group, checked all or nothing.

`INGRESS_RATE_LIMIT` is each client's budget over every limited route; a group's own policy
(`INGRESS_RATE_LIMIT_GENERATE`, ...) adds a per-route limit on top. A request passes only if every
policy that applies allows it, and only then is it counted against them.
"""

import logging
from dataclasses import dataclass

from server.core import metrics
from server.services.limits.gcra import Decision, MemoryLimiter, RedisLimiter
from server.services.limits.policy import RatePolicy

log = logging.getLogger(__name__)


class LimiterUnavailable(RuntimeError):
    """The limiter's store failed and RATE_LIMIT_FAIL_MODE=closed: HTTP 503."""


@dataclass
class IngressLimits:
    limiter: MemoryLimiter | RedisLimiter
    default: RatePolicy | None
    groups: dict[str, RatePolicy]
    fail_open: bool

    async def check(self, group: str, client: str) -> Decision | None:
        """The decision for one request of `client` to `group`; None when no policy applies (or failing open)."""
        policies = [p for p in (self.default, self.groups.get(group)) if p is not None]
        if not policies:
            return None
        try:
            decision = await self.limiter.check([(policy, f"ingress:{policy.name}:{client}") for policy in policies])
        except Exception as exc:
            metrics.RATE_LIMIT_ERRORS.labels("ingress").inc()
            log.warning("ingress limiter failed (%s: %s); failing %s", type(exc).__name__, exc,
                        "open" if self.fail_open else "closed")
            if self.fail_open:
                return None
            raise LimiterUnavailable("rate limiter unavailable") from exc
        for state in decision.states:
            verdict = "allow" if decision.allowed else "deny"
            metrics.RATE_LIMIT_DECISIONS.labels("ingress", state.policy.name, verdict).inc()
        return decision

"""Ingress limits: per client (API key, else client IP), per route group, checked all or nothing.

`INGRESS_RATE_LIMIT` is each client's budget over every limited route; a group's own policy
(`INGRESS_RATE_LIMIT_GENERATE`, ...) adds a per-route limit on top. A request passes only if every
policy that applies allows it, and only then is it counted against them.
"""

from dataclasses import dataclass

from server.core.rate_policy import RatePolicy
from server.services.limits.decide import decide
from server.services.limits.gcra import Decision, MemoryLimiter, RedisLimiter


@dataclass
class IngressLimits:
    limiter: MemoryLimiter | RedisLimiter
    default: RatePolicy | None
    groups: dict[str, RatePolicy]
    fail_open: bool

    async def check(self, group: str, client: str) -> Decision | None:
        """The decision for one request of `client` to `group`; None when no policy applies (or failing open).

        Raises `LimiterUnavailable` when the store fails and the mode is closed."""
        policies = [p for p in (self.default, self.groups.get(group)) if p is not None]
        if not policies:
            return None
        checks = [(policy, f"ingress:{policy.name}:{client}") for policy in policies]
        return await decide(self.limiter, checks, layer="ingress", fail_open=self.fail_open)

"""The egress guard: one global quota per external AI provider, shared by every replica (with Redis), and
optionally one per tenant and provider (`[tenants.<name>] egress_rate_limit` in API_KEYS_FILE) on top of it.

Features that call a paid API ask the guard first, naming the tenant they work for; a call takes one unit of every
quota that applies, or none. A refusal says when the next call is allowed, so
the caller can serve a cached or fallback answer, wait (`acquire(wait_s=...)`), or answer 429 itself.
"""

import asyncio

from server.core.rate_policy import RatePolicy
from server.services.limits.decide import LimiterUnavailable, decide
from server.services.limits.gcra import Decision, MemoryLimiter, RedisLimiter


class EgressLimited(RuntimeError):
    def __init__(self, provider: str, retry_after_s: float):
        super().__init__(f"the {provider} quota is used up; next call allowed in {retry_after_s:.1f} s")
        self.provider = provider
        self.retry_after_s = retry_after_s


class EgressGuard:
    def __init__(
        self,
        limiter: MemoryLimiter | RedisLimiter,
        policies: dict[str, RatePolicy],
        *,
        fail_open: bool,
        tenant_policies: dict[str, dict[str, RatePolicy]] | None = None,
    ):
        self.limiter = limiter
        self.policies = policies
        self.fail_open = fail_open
        # Named `<tenant>/<provider>`, so that decisions and the RateLimit figures tell the two layers apart.
        self.tenant_policies = {
            tenant: {
                provider: RatePolicy(f"{tenant}/{provider}", p.count, p.period_s, p.burst)
                for provider, p in policies_of_tenant.items()
            }
            for tenant, policies_of_tenant in (tenant_policies or {}).items()
        }

    async def check(self, provider: str, tenant: str | None = None) -> Decision | None:
        """Take one call from every quota of `provider` (global, and the tenant's own); None when none applies."""
        checks = [(policy, f"egress:{provider}") for policy in [self.policies.get(provider)] if policy]
        own = self.tenant_policies.get(tenant or "", {}).get(provider)
        if own is not None:
            checks.append((own, f"egress:{tenant}:{provider}"))
        if not checks:
            return None
        try:
            return await decide(self.limiter, checks, layer="egress", fail_open=self.fail_open)
        except LimiterUnavailable as exc:
            raise EgressLimited(provider, 1.0) from exc

    async def acquire(self, provider: str, *, tenant: str | None = None, wait_s: float = 0.0) -> None:
        """Return once a call to `provider` for `tenant` is allowed, waiting up to `wait_s`; else raise
        `EgressLimited`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            decision = await self.check(provider, tenant)
            if decision is None or decision.allowed:
                return
            if loop.time() + decision.retry_after_s > deadline:
                raise EgressLimited(provider, decision.retry_after_s)
            await asyncio.sleep(decision.retry_after_s)

"""The egress guard: one global quota per external AI provider, shared by every replica (with Redis).

Features that call a paid API ask the guard first. A refusal says when the next call is allowed, so
the caller can serve a cached or fallback answer, wait (`acquire(wait_s=...)`), or answer 429 itself.
"""

import asyncio

from server.services.limits.decide import LimiterUnavailable, decide
from server.services.limits.gcra import Decision, MemoryLimiter, RedisLimiter
from server.core.rate_policy import RatePolicy


class EgressLimited(RuntimeError):
    def __init__(self, provider: str, retry_after_s: float):
        super().__init__(f"the {provider} quota is used up; next call allowed in {retry_after_s:.1f} s")
        self.provider = provider
        self.retry_after_s = retry_after_s


class EgressGuard:
    def __init__(self, limiter: MemoryLimiter | RedisLimiter, policies: dict[str, RatePolicy], *,
                 fail_open: bool):
        self.limiter = limiter
        self.policies = policies
        self.fail_open = fail_open

    async def check(self, provider: str) -> Decision | None:
        """Take one call from `provider`'s quota if it has one; None when the provider has no quota."""
        policy = self.policies.get(provider)
        if policy is None:
            return None
        try:
            return await decide(self.limiter, [(policy, f"egress:{provider}")], layer="egress",
                                fail_open=self.fail_open)
        except LimiterUnavailable as exc:
            raise EgressLimited(provider, 1.0) from exc

    async def acquire(self, provider: str, *, wait_s: float = 0.0) -> None:
        """Return once a call to `provider` is allowed, waiting up to `wait_s`; else raise `EgressLimited`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            decision = await self.check(provider)
            if decision is None or decision.allowed:
                return
            if loop.time() + decision.retry_after_s > deadline:
                raise EgressLimited(provider, decision.retry_after_s)
            await asyncio.sleep(decision.retry_after_s)

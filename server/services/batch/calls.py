"""Every call to a batch provider: through the egress quotas, retried on transient failures.

A call first takes one unit of the provider's quota (`EGRESS_RATE_LIMIT`, shared by replicas through Redis),
waiting up to `quota_wait_s`; then it runs, and a `ProviderError` that a retry can help (408, 409, 429, 5xx,
no answer) is retried with exponential backoff and jitter, after at least the provider's `Retry-After`,
at most `attempts` times in all; each retry takes the quota again. Outcomes are counted in
`batch_provider_calls_total{provider,operation,outcome}`.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from server.core import metrics
from server.providers.base import ProviderError
from server.services.limits.egress import EgressGuard, EgressLimited

log = logging.getLogger(__name__)
T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


class ProviderCalls:
    def __init__(self, egress: EgressGuard, *, attempts: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 quota_wait_s: float = 60.0):
        self.egress = egress
        self.attempts = attempts
        self.backoff = wait_random_exponential(multiplier=backoff_s, max=max_backoff_s)
        self.quota_wait_s = quota_wait_s

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        floor = exc.retry_after_s if isinstance(exc, ProviderError) and exc.retry_after_s else 0.0
        return max(floor, self.backoff(state))

    async def call(self, provider: str, operation: str, run: Callable[[], Awaitable[T]], *,
                   tenant: str | None = None) -> T:
        """`run()` under the quotas (global, and `tenant`'s own) and the retry policy; raises the last
        `ProviderError` (or `EgressLimited`)."""
        retrying = AsyncRetrying(stop=stop_after_attempt(self.attempts), wait=self._wait,
                                 retry=retry_if_exception(_retryable), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    await self.egress.acquire(provider, tenant=tenant, wait_s=self.quota_wait_s)
                    try:
                        result = await run()
                    except ProviderError as exc:
                        metrics.BATCH_PROVIDER_CALLS.labels(provider, operation, f"http_{exc.status or 'none'}").inc()
                        raise
        except EgressLimited:
            metrics.BATCH_PROVIDER_CALLS.labels(provider, operation, "quota").inc()
            raise
        metrics.BATCH_PROVIDER_CALLS.labels(provider, operation, "ok").inc()
        return result

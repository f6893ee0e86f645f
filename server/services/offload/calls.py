"""Every call to a batch provider: through the egress quotas, retried on transient failures.

A call first takes one unit of the provider's quota (`EGRESS_RATE_LIMIT`, shared by replicas through Redis),
waiting up to `quota_wait_s`; then it runs, and a `ProviderError` that a retry can help (408, 409, 429, 5xx,
no answer) is retried with exponential backoff and jitter, after at least the provider's `Retry-After`,
at most `attempts` times in all; each retry takes the quota again. Outcomes are counted in
`batch_provider_calls_total{provider,operation,outcome}`.

A batch create is the one call that must never run twice: `create` tries it once at a time and, before any
retry, looks the batch up by its idempotency key (the failed attempt may have created it: a timeout, a reset
connection and a 5xx say nothing either way), creating again only when the provider says it has none.
"""

import asyncio
import logging
import random
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


class CreateDeferred(Exception):
    """The provider asked for a longer wait before the next create than a call may hold on (`max_backoff_s`): the
    create is left to a later tick, not before `wait_s` from now."""

    def __init__(self, cause: ProviderError, wait_s: float):
        super().__init__(f"{cause}; next try in {wait_s:.0f} s")
        self.cause = cause
        self.wait_s = wait_s


class ProviderCalls:
    def __init__(
        self,
        egress: EgressGuard,
        *,
        attempts: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        quota_wait_s: float = 60.0,
    ):
        self.egress = egress
        self.attempts = attempts
        self.backoff = wait_random_exponential(multiplier=backoff_s, max=max_backoff_s)
        self.quota_wait_s = quota_wait_s
        self.max_backoff_s = max_backoff_s

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        floor = exc.retry_after_s if isinstance(exc, ProviderError) and exc.retry_after_s else 0.0
        return max(floor, self.backoff(state))

    async def call(
        self,
        provider: str,
        operation: str,
        run: Callable[[], Awaitable[T]],
        *,
        tenant: str | None = None,
        attempts: int | None = None,
    ) -> T:
        """`run()` under the quotas (global, and `tenant`'s own) and the retry policy; raises the last
        `ProviderError` (or `EgressLimited`)."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts or self.attempts),
            wait=self._wait,
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
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

    async def create(
        self,
        provider: str,
        run: Callable[[], Awaitable[str]],
        find: Callable[[], Awaitable[str | None]],
        *,
        tenant: str | None = None,
        before_attempt: Callable[[], Awaitable[None]] | None = None,
    ) -> str:
        """The provider's batch id: created by `run()`, or found by `find()` after a failed attempt.

        Raises the last `ProviderError` (no attempt left, or one a retry cannot help), `CreateDeferred`, or what
        `find` raised (a lookup that fails or cannot tell yet never leads to a create); the caller then leaves
        the batch to be looked up again. `before_attempt` runs before each attempt (the lease's fencing check)."""
        attempt = 0
        while True:
            attempt += 1
            if before_attempt is not None:
                await before_attempt()
            try:
                return await self.call(provider, "create", run, tenant=tenant, attempts=1)
            except ProviderError as exc:
                if not exc.retryable or attempt == self.attempts:
                    raise
                delay = max(
                    exc.retry_after_s or 0.0,
                    random.uniform(0, min(self.backoff.max, self.backoff.multiplier * 2**attempt)),
                )
                if delay > self.max_backoff_s:
                    raise CreateDeferred(exc, delay) from exc
            await asyncio.sleep(delay)
            found = await self.call(provider, "find", find, tenant=tenant)
            if found is not None:
                log.info("a %s batch create that failed had created the batch (%s): adopted", provider, found)
                return found

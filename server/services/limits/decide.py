"""One limiter call with the failure policy and metrics both layers share.

A limiter whose store fails (Redis down, or skipped by its open circuit) either lets the request through
(`fail_open`) or raises `LimiterUnavailable`; either way the failure is counted in `rate_limit_errors_total`
and logged at most once per interval per layer.
"""

import logging
from collections.abc import Sequence

from server.core import metrics
from server.core.rate_policy import RatePolicy
from server.core.throttled_log import ThrottledLog
from server.services.limits.gcra import Decision, MemoryLimiter, RedisLimiter

log = logging.getLogger(__name__)
_warnings = ThrottledLog(log)


class LimiterUnavailable(RuntimeError):
    """The limiter's store failed and RATE_LIMIT_FAIL_MODE=closed."""


async def decide(
    limiter: MemoryLimiter | RedisLimiter, checks: Sequence[tuple[RatePolicy, str]], *, layer: str, fail_open: bool
) -> Decision | None:
    """The decision, or None when the store failed and the mode is open."""
    try:
        decision = await limiter.check(checks)
    except Exception as exc:
        metrics.RATE_LIMIT_ERRORS.labels(layer).inc()
        _warnings.warning(
            layer,
            "%s rate limiter failed (%s: %s); failing %s",
            layer,
            type(exc).__name__,
            exc,
            "open" if fail_open else "closed",
        )
        if fail_open:
            return None
        raise LimiterUnavailable(f"{layer} rate limiter unavailable") from exc
    verdict = "allow" if decision.allowed else "deny"
    for state in decision.states:
        metrics.RATE_LIMIT_DECISIONS.labels(layer, state.policy.name, verdict).inc()
    return decision

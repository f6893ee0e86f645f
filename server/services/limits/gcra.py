"""GCRA (generic cell rate algorithm) over several policies at once, all or nothing.

For each (policy, key): T = emission interval, tolerance = T * burst; the key stores the theoretical
arrival time (TAT). A request at `now` is allowed under a policy when max(TAT, now) + T - tolerance <=
now; it is admitted only when every policy allows it, and only then are the TATs advanced. With burst B
and rate R this admits B + R*t requests in t seconds, exactly: no window edges.

`MemoryLimiter` evaluates it in this process; `RedisLimiter` in one Lua script on Redis, using Redis's own
TIME (no application clock, so replicas with skewed clocks agree), shared by every replica.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from server.core.rate_policy import RatePolicy


@dataclass(frozen=True)
class PolicyState:
    policy: RatePolicy
    remaining: int
    reset_s: int

    @property
    def header(self) -> str:
        """This policy's state in a `RateLimit` header."""
        return f'"{self.policy.name}";r={self.remaining};t={self.reset_s}'


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    states: tuple[PolicyState, ...]

    @property
    def denied_by(self) -> list[str]:
        return [state.policy.name for state in self.states if state.remaining == 0 and not self.allowed]


def _evaluate(now_us: int, tats: Sequence[int | None], policies: Sequence[RatePolicy]) -> tuple[Decision, list[int]]:
    """The decision and the new TATs (µs) for `policies` whose stored TATs are `tats`."""
    news, retry_us, states = [], 0, []
    for tat, policy in zip(tats, policies, strict=True):
        interval = round(policy.interval_s * 1_000_000)
        tolerance = interval * policy.burst
        new = max(tat or now_us, now_us) + interval
        retry_us = max(retry_us, new - tolerance - now_us)
        news.append(new)
    allowed = retry_us <= 0
    for tat, new, policy in zip(tats, news, policies, strict=True):
        interval = round(policy.interval_s * 1_000_000)
        used = (new if allowed else max(tat or now_us, now_us)) - now_us
        remaining = max(0, (interval * policy.burst - used) // interval)
        states.append(PolicyState(policy, remaining, math.ceil(used / 1_000_000)))
    return Decision(allowed, max(retry_us, 0) / 1_000_000, tuple(states)), news


MAX_MEMORY_KEYS = 100_000


class MemoryLimiter:
    """One process's limits (the default when no Redis is configured)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tats: dict[str, int] = {}

    async def check(self, checks: Sequence[tuple[RatePolicy, str]]) -> Decision:
        now = int(self.clock() * 1_000_000)
        keys = [key for _, key in checks]
        decision, news = _evaluate(now, [self._tats.get(key) for key in keys], [policy for policy, _ in checks])
        if decision.allowed:
            self._tats.update(zip(keys, news, strict=True))
        if len(self._tats) > MAX_MEMORY_KEYS:
            # A TAT in the past means a full bucket, the same as no entry: forget those.
            self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        return decision


GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local result = {now}
for i = 1, #KEYS do
  local tat = redis.call('GET', KEYS[i])
  result[i + 1] = tat or ''
end
local allowed = 1
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(result[i + 1]) or now
  if tat < now then tat = now end
  if tat + interval - tolerance > now then allowed = 0 end
end
if allowed == 1 then
  for i = 1, #KEYS do
    local interval = tonumber(ARGV[2 * i - 1])
    local tat = tonumber(result[i + 1]) or now
    if tat < now then tat = now end
    local new = tat + interval
    redis.call('SET', KEYS[i], new, 'PX', math.ceil((new - now) / 1000) + 1)
  end
end
return result
"""


class RedisLimiter:
    """Limits shared by every replica on one Redis; the script reads, decides and writes atomically."""

    def __init__(self, client: Redis, prefix: str = "ratelimit"):
        self.prefix = prefix
        self._script = client.register_script(GCRA_SCRIPT)

    async def check(self, checks: Sequence[tuple[RatePolicy, str]]) -> Decision:
        policies = [policy for policy, _ in checks]
        args = []
        for policy in policies:
            interval = round(policy.interval_s * 1_000_000)
            args += [interval, interval * policy.burst]
        reply = await self._script(keys=[f"{self.prefix}:{key}" for _, key in checks], args=args)
        now = int(reply[0])
        tats = [int(value) if value not in (b"", "") else None for value in reply[1:]]
        decision, _ = _evaluate(now, tats, policies)
        return decision

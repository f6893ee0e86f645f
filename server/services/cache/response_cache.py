"""Per-item response cache with stampede protection in the process and, on Redis, across processes.

`resolve` answers each item of a request from the store or by computing it:
- hit: read from the store (no lock, no batcher);
- miss: this caller computed it (and stored it);
- coalesced: another caller's computation answered it (in this process, or another one via the lock);
- bypass: not cacheable (sampling without a seed) or the client asked to skip the cache, so computed;
- error: the store failed, or was skipped because Redis's circuit is open; the item was computed anyway
  (single-flight still on).

In-process single-flight: one task per key computes; callers await it shielded, so one caller's
disconnect does not cancel it for the others; when the last caller leaves, the computation is cancelled
(so its item is dropped from the batch queue if it has not started). A caller that joins keeps its own terms:
its own deadline (`DeadlineExceeded` on time, whoever computes), and an interactive caller that joins a background
computation submits its own item, which the batcher merges with the waiting one and runs at interactive priority.
Only the items that start a computation count towards the batcher's admission.
A store failure never fails a request: it is counted (`cache_store_errors_total{operation}`, skipped calls
included), logged at most once per 30 s, and the item is computed. Recovery needs nothing: the store is
tried again by the next request (Redis: once its circuit breaker lets a probe through).
"""

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from server.core import metrics
from server.core.throttled_log import ThrottledLog
from server.services.cache.keys import key_pattern, scope_tag
from server.services.cache.memory import MemoryStore
from server.services.cache.redis_store import RedisStore
from server.services.errors import DeadlineExceeded
from server.services.infra.redis_client import REDIS_ERRORS

log = logging.getLogger(__name__)
Outcome = Literal["hit", "miss", "coalesced", "bypass", "error"]
# Outcomes where the item was not computed for this request: reported as `cached: true`.
SERVED_FROM_CACHE: frozenset[Outcome] = frozenset({"hit", "coalesced"})


@dataclass(eq=False)
class _Flight:
    task: "asyncio.Task[tuple[bytes, Outcome]]"
    background: bool
    waiters: int = field(default=0)


class ResponseCache:
    def __init__(self, store: MemoryStore | RedisStore, *, lock_ttl_s: float, per_tenant: bool = True):
        self.store = store
        self.lock_ttl_s = lock_ttl_s
        self.per_tenant = per_tenant
        self._flights: dict[str, _Flight] = {}
        self.outcomes: Counter[Outcome] = Counter()
        self._warnings = ThrottledLog(log)

    @property
    def backend(self) -> str:
        return self.store.name

    def _store_failed(self, operation: str, exc: BaseException) -> None:
        metrics.CACHE_STORE_ERRORS.labels(self.backend, operation).inc()
        self._warnings.warning(
            self.backend,
            "cache store (%s) failed on %s: %s: %s; computing without it",
            self.backend,
            operation,
            type(exc).__name__,
            exc,
        )

    async def resolve(
        self,
        endpoint: str,
        keys: list[str | None],
        compute: Callable[[int], Awaitable[bytes]],
        *,
        bypass: bool = False,
        timeout_s: float | None = None,
        background: bool = False,
        admit: Callable[[int], AbstractContextManager[object]] = lambda count: nullcontext(),
        on_item: Callable[[int, bytes, Outcome], None] = lambda index, value, outcome: None,
    ) -> list[tuple[bytes, Outcome]]:
        """Value and outcome for each item; `keys[i]` None means item i is not cacheable.

        `admit(n)` is entered, with the number of computations the items the store did not answer start, before
        any of them is computed and held until all are: the batcher's all-or-none admission of a request. `on_item`
        hears of each item as soon as it is answered (a stream sends it then). `timeout_s` bounds this caller's
        wait for an item computed by another (`DeadlineExceeded`); `background` is its priority (see `_join`)."""
        lookups = {i: key for i, key in enumerate(keys) if key is not None and not bypass}
        found: dict[int, bytes] = {}
        store_error = False
        if lookups:
            try:
                values = await self.store.get_many(list(lookups.values()))
                found = {i: v for i, v in zip(lookups, values, strict=True) if v is not None}
            except REDIS_ERRORS as exc:
                self._store_failed("get", exc)
                store_error = True

        async def one(i: int) -> tuple[bytes, Outcome]:
            value, outcome = await answer(i)
            on_item(i, value, outcome)
            return value, outcome

        async def answer(i: int) -> tuple[bytes, Outcome]:
            key = keys[i]
            if i in found:
                return found[i], "hit"
            if key is None:
                return await compute(i), "bypass"
            if bypass:
                value = await compute(i)
                await self._set(key, value)
                return value, "bypass"
            flight = led.get(key) if leaders.get(key) == i else None
            value, outcome = await self._join(key, lambda: compute(i), timeout_s, background, flight)
            return value, "error" if store_error and outcome == "miss" else outcome

        # No await from counting the computations to starting the flights this request leads: a concurrent identical
        # request has either started its flight before (this one joins it) or joins this one's.
        count, leaders = self._plan(keys, found, bypass, background)
        with admit(count):
            led = {key: self._start(key, partial(compute, i), background) for key, i in leaders.items()}
            results = await asyncio.gather(*(one(i) for i in range(len(keys))))
        for _, outcome in results:
            metrics.CACHE_REQUESTS.labels(endpoint, outcome).inc()
            self.outcomes[outcome] += 1
        return results

    @property
    def hit_ratio(self) -> float | None:
        """Share of cacheable items this process answered without computing them (None before the first)."""
        answered = sum(count for outcome, count in self.outcomes.items() if outcome != "bypass")
        served = sum(self.outcomes[outcome] for outcome in SERVED_FROM_CACHE)
        return served / answered if answered else None

    def scope(self, tenant: str) -> str | None:
        """The scope of `tenant`'s keys: the tenant itself (CACHE_SCOPE=tenant), or None (answers shared)."""
        return tenant if self.per_tenant else None

    def _pattern(self, endpoint: str | None, model: str | None, tenant: str | None) -> str:
        """Keys of `endpoint` and `model` (None: any) that `tenant` may see (None: every key, for an admin)."""
        return key_pattern(endpoint, model, scope_tag(self.scope(tenant)) if tenant is not None else None)

    async def entries(self, endpoint: str | None = None, model: str | None = None, tenant: str | None = None) -> int:
        """Cached answers of `endpoint` and `model` (None: any) that `tenant` may see, every replica's on Redis."""
        return await self.store.count(self._pattern(endpoint, model, tenant))

    async def remove(self, endpoint: str | None = None, model: str | None = None, tenant: str | None = None) -> int:
        """Remove the cached answers of `endpoint` and `model` (None: any) that `tenant` may see; how many."""
        return await self.store.delete_matching(self._pattern(endpoint, model, tenant))

    def _plan(
        self, keys: list[str | None], found: dict[int, bytes], bypass: bool, background: bool
    ) -> tuple[int, dict[str, int]]:
        """How many batcher items the items the store did not answer will submit, and the keys this request leads
        (no computation in flight), each with its first item. A joiner submits nothing, unless it promotes a
        background computation (its submit then merges with that one in the batcher); an uncacheable item, one."""
        leaders: dict[str, int] = {}
        promoted: set[str] = set()
        uncached = 0
        for i, key in enumerate(keys):
            if i in found:
                continue
            if key is None or bypass:
                uncached += 1
            elif (flight := self._flights.get(key)) is None:
                leaders.setdefault(key, i)
            elif flight.background and not background:
                promoted.add(key)
        return uncached + len(leaders) + len(promoted), leaders

    def _start(self, key: str, compute: Callable[[], Awaitable[bytes]], background: bool) -> _Flight:
        flight = _Flight(asyncio.create_task(self._fill(key, compute)), background)
        self._flights[key] = flight
        flight.task.add_done_callback(lambda _: self._flights.pop(key, None))
        return flight

    async def _join(
        self,
        key: str,
        compute: Callable[[], Awaitable[bytes]],
        timeout_s: float | None,
        background: bool,
        led: _Flight | None = None,
    ) -> tuple[bytes, Outcome]:
        """This caller's answer from `led` (the flight it started), else from the key's flight in progress, else
        from a flight it starts now."""
        flight = led or self._flights.get(key)
        leader = led is not None
        if flight is None:
            flight, leader = self._start(key, compute, background), True
        flight.waiters += 1
        outcome: Outcome
        try:
            # A leader's computation carries the same deadline into the batcher, which ends it there (and books why:
            # `deadline`); timing it out here too would race that and cancel it instead.
            async with asyncio.timeout(None if leader else timeout_s):
                if flight.background and not background:
                    # The flight's item waits in the batcher's background class: this caller's own submit merges
                    # with it there, at interactive priority; the flight still stores the value.
                    value, outcome = await compute(), "coalesced"
                else:
                    value, outcome = await asyncio.shield(flight.task)
        except TimeoutError as exc:
            if isinstance(exc, DeadlineExceeded):
                raise
            raise DeadlineExceeded(
                f"the answer, computed for another request, did not come within {timeout_s:g} s (REQUEST_TIMEOUT_S)"
            ) from None
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()
        return value, outcome if leader else "coalesced"

    async def _set(self, key: str, value: bytes) -> None:
        try:
            await self.store.set(key, value)
        except REDIS_ERRORS as exc:
            self._store_failed("set", exc)

    async def _fill(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Outcome]:
        if not isinstance(self.store, RedisStore):
            value = await compute()
            await self._set(key, value)
            return value, "miss"
        while True:
            try:
                token = await self.store.try_lock(key)
            except REDIS_ERRORS as exc:
                self._store_failed("lock", exc)
                return await compute(), "miss"
            if token is not None:
                return await self._lead(self.store, key, token, compute)
            if self.store.holds_finished(key):
                # The holder is this process's own computation, over but not released (Redis failed then):
                # release it now, storing its value, rather than sleep until the lock expires.
                try:
                    await self.store.settle(key)
                except REDIS_ERRORS as exc:
                    self._store_failed("release", exc)
                    return await compute(), "miss"
                continue
            try:
                published = await self.store.wait_for(key, self.lock_ttl_s)
            except REDIS_ERRORS as exc:
                self._store_failed("wait", exc)
                return await compute(), "miss"
            if published is not None:
                return published, "coalesced"

    async def _release(self, store: RedisStore, key: str, token: str) -> None:
        try:
            await store.release(key, token)
        except REDIS_ERRORS as exc:
            self._store_failed("release", exc)

    async def _lead(
        self, store: RedisStore, key: str, token: str, compute: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, Outcome]:
        """Holding the lock: double-check, compute, then store + release + publish in one script."""
        try:
            [value] = await store.get_many([key])
        except REDIS_ERRORS as exc:
            self._store_failed("get", exc)
            value = None
        if value is not None:
            await self._release(store, key, token)
            return value, "coalesced"
        try:
            value = await compute()
        except BaseException:
            await self._release(store, key, token)
            raise
        try:
            await store.store_and_release(key, value, token)
        except REDIS_ERRORS as exc:
            self._store_failed("set", exc)
        return value, "miss"

"""Per-item response cache with stampede protection in the process and, on Redis, across processes.

`resolve` answers each item of a request from the store or by computing it:
- hit: read from the store (no lock, no batcher);
- miss: this caller computed it (and stored it);
- coalesced: another caller's computation answered it (in this process, or another one via the lock);
- bypass: not cacheable (sampling without a seed) or the client asked to skip the cache, so computed;
- error: the store failed; the item was computed anyway (single-flight still on).

In-process single-flight: one task per key computes; callers await it shielded, so one caller's
disconnect does not cancel it for the others; when the last caller leaves, the computation is cancelled
(so its item is dropped from the batch queue if it has not started).
A store failure never fails a request: it is counted, logged at most once per `ERROR_LOG_INTERVAL_S`,
and the item is computed; the next request tries the store again, so recovery needs nothing.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

from redis.exceptions import RedisError

from server.core import metrics
from server.services.cache.memory import MemoryStore
from server.services.cache.redis_store import RedisStore

log = logging.getLogger(__name__)
Outcome = Literal["hit", "miss", "coalesced", "bypass", "error"]
# Outcomes where the item was not computed for this request: reported as `cached: true`.
SERVED_FROM_CACHE: frozenset[Outcome] = frozenset({"hit", "coalesced"})
ERROR_LOG_INTERVAL_S = 30.0
STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(eq=False)
class _Flight:
    task: "asyncio.Task[tuple[bytes, Outcome]]"
    waiters: int = field(default=0)


class ResponseCache:
    def __init__(self, store: MemoryStore | RedisStore, *, lock_ttl_s: float):
        self.store = store
        self.lock_ttl_s = lock_ttl_s
        self._flights: dict[str, _Flight] = {}
        self._last_error_log = -float("inf")

    @property
    def backend(self) -> str:
        return self.store.name

    def _store_failed(self, operation: str, exc: BaseException) -> None:
        metrics.CACHE_STORE_ERRORS.labels(self.backend, operation).inc()
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.warning("cache store (%s) failed on %s: %s: %s; computing without it (logged at most every %.0f s)",
                        self.backend, operation, type(exc).__name__, exc, ERROR_LOG_INTERVAL_S)

    async def resolve(self, endpoint: str, keys: list[str | None], compute: Callable[[int], Awaitable[bytes]],
                      *, bypass: bool = False,
                      admit: Callable[[int], AbstractContextManager[object]] = lambda count: nullcontext()
                      ) -> list[tuple[bytes, Outcome]]:
        """Value and outcome for each item; `keys[i]` None means item i is not cacheable.

        `admit(n)` is entered, with the number of items the store did not answer, before any of them is computed
        and held until all are: the batcher's all-or-none admission of a request."""
        lookups = [i for i, key in enumerate(keys) if key is not None and not bypass]
        found: dict[int, bytes] = {}
        store_error = False
        if lookups:
            try:
                values = await self.store.get_many([keys[i] for i in lookups])
                found = {i: v for i, v in zip(lookups, values) if v is not None}
            except STORE_ERRORS as exc:
                self._store_failed("get", exc)
                store_error = True

        async def one(i: int) -> tuple[bytes, Outcome]:
            key = keys[i]
            if i in found:
                return found[i], "hit"
            if key is None:
                return await compute(i), "bypass"
            if bypass:
                value = await compute(i)
                await self._set(key, value)
                return value, "bypass"
            value, outcome = await self._join(key, lambda: compute(i))
            return value, "error" if store_error and outcome == "miss" else outcome

        with admit(len(keys) - len(found)):
            results = await asyncio.gather(*(one(i) for i in range(len(keys))))
        for _, outcome in results:
            metrics.CACHE_REQUESTS.labels(endpoint, outcome).inc()
        return results

    async def _join(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Outcome]:
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = _Flight(asyncio.create_task(self._fill(key, compute)))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda _: self._flights.pop(key, None))
        flight.waiters += 1
        try:
            value, outcome = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()
        return value, outcome if leader else "coalesced"

    async def _set(self, key: str, value: bytes) -> None:
        try:
            await self.store.set(key, value)
        except STORE_ERRORS as exc:
            self._store_failed("set", exc)

    async def _fill(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Outcome]:
        if not isinstance(self.store, RedisStore):
            value = await compute()
            await self._set(key, value)
            return value, "miss"
        while True:
            try:
                token = await self.store.try_lock(key)
            except STORE_ERRORS as exc:
                self._store_failed("lock", exc)
                return await compute(), "miss"
            if token is not None:
                return await self._lead(key, token, compute)
            try:
                value = await self.store.wait_for(key, self.lock_ttl_s)
            except STORE_ERRORS as exc:
                self._store_failed("wait", exc)
                return await compute(), "miss"
            if value is not None:
                return value, "coalesced"

    async def _release(self, key: str, token: str) -> None:
        try:
            await self.store.release(key, token)
        except STORE_ERRORS as exc:
            self._store_failed("release", exc)

    async def _lead(self, key: str, token: str, compute: Callable[[], Awaitable[bytes]]) -> tuple[bytes, Outcome]:
        """Holding the lock: double-check, compute, then store + release + publish in one script."""
        try:
            [value] = await self.store.get_many([key])
        except STORE_ERRORS as exc:
            self._store_failed("get", exc)
            value = None
        if value is not None:
            await self._release(key, token)
            return value, "coalesced"
        try:
            value = await compute()
        except BaseException:
            await self._release(key, token)
            raise
        try:
            await self.store.store_and_release(key, value, token)
        except STORE_ERRORS as exc:
            self._store_failed("set", exc)
        return value, "miss"

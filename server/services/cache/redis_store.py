"""Redis cache store (redis.asyncio + hiredis) with the cross-process stampede lock.

Lock protocol (docs/design-decisions.md): the leader takes `lock:{key}` with
SET NX PX and a random token, computes, then one Lua script stores the value, deletes the lock only if
it still holds the token, and publishes on `done:{key}`. Waiters subscribe before re-reading the key
(no lost wake-up), then sleep on the subscription (no polling) until the publish or the lock's expiry.
That sleep is a wait for another process's computation, not a socket timeout: REDIS_TIMEOUT_S does not cut it.
Every command passes through the client's circuit breaker, the subscription included.

The process's waiters share one pub/sub connection (`LockWaiters`): a waiting key costs a future, not a pooled
connection, so any number of them leave the command pool to commands.

A holder whose release failed (Redis stalled, or skipped by the open circuit) keeps it pending (`Settlements`), with
its value: it is retried as soon as the circuit closes, and a waiter of this process that meets such a lock settles
it first instead of sleeping until it expires. Other processes' waiters wake at that publish.
"""

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar, cast

from redis.asyncio.client import PubSub
from redis.exceptions import TimeoutError as RedisTimeout

from server.services.infra.redis_client import REDIS_ERRORS, GuardedRedis

log = logging.getLogger(__name__)

STORE_AND_RELEASE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], '1')
return 1
"""
# A holder that gives up (its computation failed) wakes the waiters, so one of them takes over at once instead of
# sleeping until the lock expires.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
"""
SCAN_BATCH = 500


def lock_key(key: str) -> str:
    return f"lock:{key}"


def done_channel(key: str) -> str:
    return f"done:{key}"


class LockWaiters:
    """Waits for `done:{key}` publishes, for the whole process, on one pub/sub connection read by one task."""

    _of: ClassVar["weakref.WeakKeyDictionary[GuardedRedis, LockWaiters]"] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, client: GuardedRedis) -> "LockWaiters":
        """The waiters of `client`'s process (one registry per client, so per server process)."""
        if client not in cls._of:
            cls._of[client] = cls(client)
            client.closers.append(cls._of[client].close)
        return cls._of[client]

    def __init__(self, client: GuardedRedis):
        self.client = client
        self.timeout_s: float = client.connection_pool.connection_kwargs.get("socket_timeout") or 1.0
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task | None = None
        self._commands = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}

    @asynccontextmanager
    async def subscription(self, channel: str) -> AsyncIterator["asyncio.Future[None]"]:
        """Subscribed to `channel` (Redis confirmed it) for the body, which gets a future set at its next publish
        (or when the connection is lost: the caller then re-reads what it waits for)."""
        published: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, set()).add(published)
        try:
            async with self.client.circuit.guard():
                confirmed = await self._subscribe(channel)
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await asyncio.shield(confirmed)
                except TimeoutError:
                    raise RedisTimeout(f"no SUBSCRIBE confirmation within {self.timeout_s:g} s") from None
            yield published
        finally:
            waiters = self._waiters.get(channel, set())
            waiters.discard(published)
            if not waiters:
                self._waiters.pop(channel, None)
                await self._unsubscribe(channel)

    async def _subscribe(self, channel: str) -> "asyncio.Future[None]":
        async with self._commands:
            if channel not in self._confirmed:
                if self._pubsub is None:
                    self._pubsub = self.client.pubsub()
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
                try:
                    await self._pubsub.subscribe(channel)
                except BaseException:
                    # Not subscribed: the next waiter tries again rather than waiting for a confirmation.
                    del self._confirmed[channel]
                    raise
                if self._reader is None:
                    self._reader = asyncio.create_task(self._read(self._pubsub), name="lock-waiters")
            return self._confirmed[channel]

    async def _unsubscribe(self, channel: str) -> None:
        async with self._commands:
            # A waiter that came meanwhile keeps the subscription.
            if channel in self._waiters or channel not in self._confirmed or self._pubsub is None:
                return
            del self._confirmed[channel]
            try:
                await self._pubsub.unsubscribe(channel)
            except REDIS_ERRORS:
                # The subscription stays until the connection closes; a publish on it wakes nobody.
                pass

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                if message["type"] == "subscribe":
                    if (confirmed := self._confirmed.get(channel)) is not None and not confirmed.done():
                        confirmed.set_result(None)
                elif message["type"] == "message":
                    for published in self._waiters.get(channel, ()):
                        if not published.done():
                            published.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "the stampede lock's pub/sub connection failed (%s: %s); waiters re-check their keys",
                type(exc).__name__,
                exc,
            )
        finally:
            self._lost(pubsub)
            try:
                await pubsub.aclose()
            except REDIS_ERRORS:
                pass

    def _lost(self, pubsub: PubSub) -> None:
        """The connection is gone: every waiter re-reads its key, and the next one subscribes on a new one."""
        if self._pubsub is pubsub:
            self._pubsub, self._reader = None, None
        for confirmed in self._confirmed.values():
            if not confirmed.done():
                confirmed.set_exception(ConnectionError("the pub/sub connection was lost"))
        self._confirmed.clear()
        for waiters in self._waiters.values():
            for published in waiters:
                if not published.done():
                    published.set_result(None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


@dataclass
class _Unreleased:
    token: str
    value: bytes | None
    since: float


class RedisStore:
    name = "redis"

    def __init__(self, client: GuardedRedis, ttl_s: float, lock_ttl_s: float):
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self._store_and_release = self.client.register_script(STORE_AND_RELEASE)
        self._release = self.client.register_script(RELEASE)
        self.waiters = LockWaiters.of(client)
        # Locks this process holds for computations that are over, whose release failed: key -> token and value.
        self._unreleased: dict[str, _Unreleased] = {}
        self._settling: set[asyncio.Task] = set()
        client.circuit.on_close(self._settle_all)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        # The client does not decode responses: values come back as bytes, never str.
        return cast(list[bytes | None], await self.client.mget(keys))

    async def set(self, key: str, value: bytes) -> None:
        await self.client.set(key, value, px=self.ttl_ms)

    async def try_lock(self, key: str) -> str | None:
        """A token when this caller now holds the key's lock, None when another caller does."""
        token = secrets.token_hex(16)
        return token if await self.client.set(lock_key(key), token, nx=True, px=self.lock_ttl_ms) else None

    async def store_and_release(self, key: str, value: bytes, token: str) -> None:
        """Store, release and publish; if Redis fails, kept to retry when its circuit closes (then re-raised)."""
        await self._settle(key, _Unreleased(token, value, time.monotonic()))

    async def release(self, key: str, token: str) -> None:
        """Release and publish (no value: a waiter takes over); kept to retry when Redis failed (then re-raised)."""
        await self._settle(key, _Unreleased(token, None, time.monotonic()))

    async def _settle(self, key: str, lock: _Unreleased) -> None:
        self._unreleased.pop(key, None)
        try:
            if lock.value is not None:
                await self._store_and_release(
                    keys=[key, lock_key(key)], args=[lock.value, self.ttl_ms, lock.token, done_channel(key)]
                )
            else:
                await self._release(keys=[lock_key(key)], args=[lock.token, done_channel(key)])
        except REDIS_ERRORS:
            # Past the lock's TTL Redis has expired it: nothing left to release.
            if time.monotonic() - lock.since < self.lock_ttl_ms / 1000:
                self._unreleased.setdefault(key, lock)
            raise

    def holds_finished(self, key: str) -> bool:
        """Whether this process holds `key`'s lock for a computation that is over (its release failed)."""
        return key in self._unreleased

    async def settle(self, key: str) -> None:
        """Retry the failed release of `key`'s lock now (raises if Redis fails again)."""
        if (lock := self._unreleased.get(key)) is not None:
            await self._settle(key, lock)

    def _settle_all(self) -> None:
        """The circuit closed: retry every failed release, so no waiter sleeps until those locks expire."""
        if self._unreleased:
            task = asyncio.get_running_loop().create_task(self._settle_pending())
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle_pending(self) -> None:
        for key in list(self._unreleased):
            try:
                await self.settle(key)
            except REDIS_ERRORS:
                return

    async def wait_for(self, key: str, max_wait_s: float) -> bytes | None:
        """The key's value once its lock holder publishes; None if the lock expires (or `max_wait_s`) first."""
        async with self.waiters.subscription(done_channel(key)) as published:
            value = cast(bytes | None, await self.client.get(key))
            if value is not None:
                return value
            remaining_ms = await self.client.pttl(lock_key(key))
            try:
                async with asyncio.timeout(min(max_wait_s, max(remaining_ms, 0) / 1000)):
                    await asyncio.shield(published)
            except TimeoutError:
                pass
            return cast(bytes | None, await self.client.get(key))

    async def count(self, pattern: str) -> int:
        """Keys matching the glob `pattern`, by SCAN (never KEYS: it would block Redis on a large keyspace)."""
        total = 0
        cursor = 0
        while True:
            cursor, keys = await self.client.scan(cursor, match=pattern, count=SCAN_BATCH)
            total += len(keys)
            if cursor == 0:
                return total

    async def delete_matching(self, pattern: str) -> int:
        """Remove the keys matching `pattern`: SCAN in batches, each batch UNLINKed (freed off Redis's main thread);
        how many were removed."""
        removed = 0
        cursor = 0
        while True:
            cursor, keys = await self.client.scan(cursor, match=pattern, count=SCAN_BATCH)
            if keys:
                removed += await self.client.unlink(*keys)
            if cursor == 0:
                return removed

"""Redis cache store (redis.asyncio + hiredis) with the cross-process stampede lock.

Lock protocol (../../../../shared/reference/caching-and-limits.md): the leader takes `lock:{key}` with
SET NX PX and a random token, computes, then one Lua script stores the value, deletes the lock only if
it still holds the token, and publishes on `done:{key}`. Waiters subscribe before re-reading the key
(no lost wake-up), then sleep on the subscription (no polling) until the publish or the lock's expiry.
That sleep is a wait for another process's computation, not a socket timeout: REDIS_TIMEOUT_S does not cut it.
Every command passes through the client's circuit breaker, the subscription included.
"""

import asyncio
import secrets

from server.services.redis_client import GuardedRedis

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


class RedisStore:
    name = "redis"

    def __init__(self, client: GuardedRedis, ttl_s: float, lock_ttl_s: float):
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self._store_and_release = self.client.register_script(STORE_AND_RELEASE)
        self._release = self.client.register_script(RELEASE)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self.client.mget(keys)

    async def set(self, key: str, value: bytes) -> None:
        await self.client.set(key, value, px=self.ttl_ms)

    async def try_lock(self, key: str) -> str | None:
        """A token when this caller now holds the key's lock, None when another caller does."""
        token = secrets.token_hex(16)
        return token if await self.client.set(lock_key(key), token, nx=True, px=self.lock_ttl_ms) else None

    async def store_and_release(self, key: str, value: bytes, token: str) -> None:
        await self._store_and_release(keys=[key, lock_key(key)],
                                      args=[value, self.ttl_ms, token, done_channel(key)])

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[lock_key(key)], args=[token, done_channel(key)])

    async def wait_for(self, key: str, max_wait_s: float) -> bytes | None:
        """The key's value once its lock holder publishes; None if the lock expires (or `max_wait_s`) first."""
        async with self.client.pubsub() as pubsub:
            async with self.client.circuit.guard():
                await pubsub.subscribe(done_channel(key))
            value = await self.client.get(key)
            if value is not None:
                return value
            remaining_ms = await self.client.pttl(lock_key(key))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(max_wait_s, max(remaining_ms, 0) / 1000)
            while (left := deadline - loop.time()) > 0:
                if await pubsub.get_message(ignore_subscribe_messages=True, timeout=left):
                    break
            return await self.client.get(key)


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

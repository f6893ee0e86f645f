"""Response cache: keys, stores (in-memory LRU, Redis) and the stampede-safe `ResponseCache`."""

from server.services.cache.memory import MemoryStore
from server.services.cache.redis_store import RedisStore
from server.services.cache.response_cache import SERVED_FROM_CACHE, Outcome, ResponseCache
from server.services.infra.redis_client import GuardedRedis

__all__ = ["SERVED_FROM_CACHE", "MemoryStore", "Outcome", "RedisStore", "ResponseCache", "open_store"]


def open_store(
    redis: GuardedRedis | None, *, ttl_s: float, max_items: int, lock_ttl_s: float
) -> MemoryStore | RedisStore:
    """Redis when one is configured (shared by replicas), else the in-process LRU."""
    if redis is not None:
        return RedisStore(redis, ttl_s=ttl_s, lock_ttl_s=lock_ttl_s)
    return MemoryStore(max_items=max_items, ttl_s=ttl_s)

"""The one Redis connection pool of a server process, shared by the cache and the rate limiter."""

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

SOCKET_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64


def open_redis(url: str) -> Redis:
    """Fail fast (no retries: callers have a fallback), and queue bursts for a connection instead of
    failing them with "Too many connections"."""
    pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT_S,
                                           socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S,
                                           retry=Retry(NoBackoff(), 0))
    return Redis.from_pool(pool)

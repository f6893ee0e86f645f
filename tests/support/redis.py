import asyncio

import httpx


async def redis_answers_again(client: httpx.AsyncClient) -> None:
    """Wait until the server uses Redis again after a restart: /health's ping is the circuit breaker's probe once
    its interval is over (at most 30 s)."""
    for _ in range(400):
        if (await client.get("/health")).json()["checks"]["redis"]["detail"]["circuit"] == "closed":
            return
        await asyncio.sleep(0.1)
    raise AssertionError("Redis's circuit did not close")

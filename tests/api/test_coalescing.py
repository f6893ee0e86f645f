"""Coalescing through the whole app: requests that join an identical computation reserve no queue room."""

import asyncio
import threading

from tests.support.app import serving
from tests.support.waiting import until


async def test_identical_requests_in_flight_leave_room_for_another(settings):
    """SCHEDULER_QUEUE_LIMIT=8: eight identical requests are one computation, so a ninth, different one is admitted."""
    limited = settings.model_copy(update={"scheduler_queue_limit": 8})
    async with serving(limited) as client:
        runtime = client.app.state.runtime
        cache = runtime.cache
        # The torch thread held: the computation stays in flight while the other requests arrive.
        held = threading.Event()
        runtime.generation.batcher.executor.submit(held.wait, 30)
        body = {"prompts": ["the same story"], "max_new_tokens": 8}
        same = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(8)]
        await until(lambda: sum(flight.waiters for flight in cache._flights.values()) == 8, 5)
        other = asyncio.create_task(client.post("/generate", json={"prompts": ["something else"], "max_new_tokens": 2}))
        await asyncio.sleep(0.1)
        held.set()
        other = await other
        assert other.status_code == 200, other.text
        assert [response.status_code for response in await asyncio.gather(*same)] == [200] * 8

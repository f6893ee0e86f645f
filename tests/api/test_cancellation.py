import asyncio
import json

import httpx
import pytest
import uvicorn
from starlette.requests import Request

from server.api.cancellation import ClientClosed, unless_disconnected
from server.main import create_app
from tests.api.gates import Gate, until_queued
from tests.support.metrics import metric
from tests.support.servers import free_port
from tests.support.waiting import until


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
async def test_a_request_whose_client_disconnected_is_dropped_before_its_batch(settings, scheduler):
    """Over real HTTP (uvicorn): closing the connection cancels the work, so the model never sees it."""
    app = create_app(settings.model_copy(update={"generator_scheduler": scheduler}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        batcher = app.state.runtime.generation.batcher
        gate = Gate(batcher)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            first = asyncio.create_task(client.post("/generate", json={"prompts": ["warm up"], "max_new_tokens": 2}))
            await gate.wait_entered()
            dropped_before = metric("scheduler_dropped_items_total", model="generator", reason="cancelled")
            ended_before = metric("http_request_duration_seconds_count", method="POST", route="/generate")
            answered = {
                status: metric("http_requests_total", method="POST", route="/generate", status=status)
                for status in ("499", "500")
            }
            body = json.dumps({"prompts": ["nobody will read this"], "max_new_tokens": 2}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            # Each step waits for what it needs, not a fixed time (which a loaded machine may exceed): the request
            # waits in the queue, then the server ends it as its client left, and only then is the model let go.
            await until_queued(batcher, 1)
            writer.close()
            await until(
                lambda: metric("http_request_duration_seconds_count", method="POST", route="/generate") > ended_before
            )
            gate.open.set()
            assert (await first).status_code == 200
            await until(
                lambda: metric("scheduler_dropped_items_total", model="generator", reason="cancelled") > dropped_before
            )
        assert len(gate.batches) == 1
        # A client that left is a 499 (ClientClosed), not the 500 of a CancelledError escaping the app.
        for status, change in (("499", 1), ("500", 0)):
            now = metric("http_requests_total", method="POST", route="/generate", status=status)
            assert now - answered[status] == change, status
        assert metric("scheduler_dropped_items_total", model="generator", reason="cancelled") - dropped_before == 1
    finally:
        server.should_exit = True
        await serving


def _request(receive) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_a_disconnect_cancels_the_work_and_ends_the_handler_with_client_closed():
    left = asyncio.Event()

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    work = asyncio.create_task(asyncio.sleep(60))
    handler = asyncio.create_task(unless_disconnected(_request(receive), work))
    await asyncio.sleep(0)
    left.set()
    with pytest.raises(ClientClosed):
        await handler
    assert work.cancelled()


async def test_a_handler_cancelled_itself_stays_cancelled_and_cancels_its_work():
    """A server shutting down cancels the handler: that is no client leaving, and must propagate as it is."""

    async def receive():
        await asyncio.Event().wait()

    work = asyncio.create_task(asyncio.sleep(60))
    handler = asyncio.create_task(unless_disconnected(_request(receive), work))
    await asyncio.sleep(0)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert work.cancelled()

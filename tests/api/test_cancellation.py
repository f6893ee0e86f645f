import asyncio
import json

import httpx
import pytest
import uvicorn

from server.main import create_app
from tests.api.gates import Gate
from tests.support.metrics import metric
from tests.support.servers import free_port


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
        gate = Gate(app.state.runtime.generation.batcher)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            first = asyncio.create_task(client.post("/generate", json={"prompts": ["warm up"], "max_new_tokens": 2}))
            await gate.wait_entered()
            dropped_before = metric("scheduler_dropped_items_total", model="generator", reason="cancelled")
            body = json.dumps({"prompts": ["nobody will read this"], "max_new_tokens": 2}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.sleep(0.2)
            gate.open.set()
            assert (await first).status_code == 200
            await asyncio.sleep(0.1)
        assert len(gate.batches) == 1
        assert metric("scheduler_dropped_items_total", model="generator", reason="cancelled") - dropped_before == 1
    finally:
        server.should_exit = True
        await serving

"""Request bodies over real HTTP: the whole-body deadline, and a client that leaves mid-body."""

import asyncio
import socket
import time

import pytest
import uvicorn

from server.main import create_app
from tests.support.metrics import metric
from tests.support.servers import free_port
from tests.support.waiting import until

HEAD = (
    b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
    b"Connection: close\r\n\r\n"
)


@pytest.fixture
async def port(settings):
    app = create_app(settings.model_copy(update={"body_timeout_s": 3.0, "body_deadline_s": 2.5}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    yield port
    server.should_exit = True
    await serving


def trickle(port: int) -> tuple[bytes, float, int]:
    """Send a body a byte a second (each well within BODY_TIMEOUT_S) until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(HEAD)
        started, sent = time.monotonic(), 0
        client.settimeout(1.0)
        while sent < 1000:
            try:
                answer = client.recv(4096)
            except TimeoutError:
                client.sendall(b" ")
                sent += 1
                continue
            client.settimeout(30)
            while chunk := client.recv(4096):
                answer += chunk
            return answer, time.monotonic() - started, sent
    raise AssertionError("the whole body was sent and never cut")


async def test_a_body_trickled_at_one_byte_a_second_is_cut_by_the_whole_body_deadline(port):
    answer, took, sent = await asyncio.to_thread(trickle, port)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"BODY_DEADLINE_S" in answer
    assert 2 <= sent <= 10 and took < 10


async def test_a_client_that_leaves_mid_body_is_recorded_499_not_400(port):
    labels = {"method": "POST", "route": "/predict"}
    before = {status: metric("http_requests_total", **labels, status=status) for status in ("400", "499")}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(HEAD + b'{"text": "half')
        await asyncio.sleep(0.3)
    await until(lambda: metric("http_requests_total", **labels, status="499") > before["499"], 10, 0.05)
    assert metric("http_requests_total", **labels, status="400") == before["400"]

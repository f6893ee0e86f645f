"""SIGTERM on real server processes: the drain (readiness 503 at once, requests still answered for DRAIN_S), and
the bounded exit of bare uvicorn with clients that never finish their bodies."""

import json
import signal
import socket
import threading
import time

import httpx

from tests.support.servers import start_server

DRAIN_S = 3.0
SHUTDOWN_TIMEOUT_S = 2.0
# Stopping uvicorn, the batchers and the interpreter, on a loaded 2-core machine: generous on purpose.
EXIT_MARGIN_S = 20


def test_sigterm_under_load_drains_readiness_503_at_once_and_every_request_meanwhile_is_answered(standins, tmp_path):
    process, port = start_server(
        standins, tmp_path, DRAIN_S=str(DRAIN_S), SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S), INGRESS_RATE_LIMIT="off"
    )
    base = f"http://127.0.0.1:{port}"
    sent: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                at = time.monotonic()
                try:
                    status: int | str = client.post(
                        "/generate", json={"prompts": [f"client {worker} asks {i}"], "max_new_tokens": 3}
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                sent.append((at, status))

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        ready = httpx.get(f"{base}/health", timeout=5)
        assert ready.status_code == 503 and ready.json()["checks"]["drain"]["status"] == "down"
        process.wait(DRAIN_S + SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
        process.kill()
    during_drain = [status for at, status in sent if signalled <= at < signalled + DRAIN_S - 0.5]
    assert len(during_drain) >= 4 and set(during_drain) == {200}, during_drain


def test_bare_uvicorn_exits_within_the_bound_and_a_body_never_finished_gets_a_json_503(standins, tmp_path):
    # The body deadlines far away: the bound under test is the shutdown's, not the body reader's.
    process, port = start_server(
        standins,
        tmp_path,
        ("-m", "uvicorn", "server.main:app"),
        DRAIN_S="1",
        SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
        BODY_TIMEOUT_S="600",
        BODY_DEADLINE_S="600",
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(
                b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
            )
            # uvicorn answers 100 Continue when the app first asks for the body: the request is in the app now.
            assert client.recv(100).startswith(b"HTTP/1.1 100 Continue")
            client.sendall(b'{"text": "never finish')
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
            process.wait(1 + SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
            exited_in = time.monotonic() - signalled
    finally:
        process.kill()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert "shutting down" in json.loads(body)["detail"]
    assert exited_in < 1 + SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log, log

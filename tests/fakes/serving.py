"""Serving a fake provider: a Starlette app under uvicorn on a loopback port in a background thread, with a log of
every request it received, and the small wire helpers the three fakes share."""

import asyncio
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.behaviour import BatchBehaviour
from tests.support.servers import free_port

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the fake received it. Header names are lower case."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeServer:
    """Base of the fakes: state guarded by `lock` (handlers run on uvicorn's thread, tests read from theirs), a log
    of every request, and `serve()`. Subclasses list their routes in `routes()` and set `settings`."""

    settings: BatchBehaviour

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.base_url = ""
        self._log: list[LoggedRequest] = []
        self._closing = threading.Event()
        self.held = threading.Event()

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def route(self, path: str, endpoint: Endpoint, method: str) -> Route:
        """A route whose requests are logged before `endpoint` answers them."""

        async def logged(request: Request) -> Response:
            body = await request.body()
            entry = LoggedRequest(
                request.method,
                request.url.path,
                dict(request.query_params),
                {name.lower(): value for name, value in request.headers.items()},
                body,
            )
            with self.lock:
                self._log.append(entry)
            return await endpoint(request)

        return Route(path, logged, methods=[method])

    @property
    def requests(self) -> list[LoggedRequest]:
        with self.lock:
            return list(self._log)

    def calls(self, method: str, path_pattern: str) -> list[LoggedRequest]:
        """Logged requests with this method whose path fully matches the regular expression `path_pattern`."""
        pattern = re.compile(path_pattern)
        return [entry for entry in self.requests if entry.method == method and pattern.fullmatch(entry.path)]

    async def pause(self, seconds: float) -> None:
        """Sleep up to `seconds`; cut short when the server shuts down, so a hanging answer never delays teardown."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._closing.is_set():
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def hold(self, step: str) -> None:
        """Keep this answer back while `settings.hold_at` names `step` (see BatchBehaviour), once `held` is set.
        Only the first request of the step is held: the client that takes over after the kill goes through."""
        if self.settings.hold_at != step or self.held.is_set():
            return
        self.held.set()
        while self.settings.hold_at == step and not self._closing.is_set():
            await asyncio.sleep(0.05)

    async def answer_created(self, fault: str | None, answer: Response) -> Response:
        """The answer to a batch create that was accepted, or what `fault` (see BatchBehaviour) puts in its place:
        the client cannot tell whether the batch exists."""
        await self.hold("create")
        if fault == "502_after":
            return Response(
                "<html><body><h1>502 Bad Gateway</h1></body></html>", status_code=502, media_type="text/html"
            )
        if fault == "reset_after":
            # Fewer bytes than Content-Length declares: the server closes the connection mid-answer.
            return Response(
                answer.body[:10], media_type="application/json", headers={"content-length": str(len(answer.body))}
            )
        if fault == "stall_after":
            await self.pause(self.settings.stall_s)
        return answer

    @contextmanager
    def serve(self) -> Iterator[Self]:
        """Listen on 127.0.0.1 and a free port until the block ends; `base_url` is `http://127.0.0.1:PORT`."""
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self._closing.clear()
        config = uvicorn.Config(
            Starlette(routes=self.routes()),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"{type(self).__name__}:{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start on port {port}")
            time.sleep(0.01)
        try:
            yield self
        finally:
            self._closing.set()
            server.should_exit = True
            thread.join(timeout=15)


def unix_now() -> int:
    return int(time.time())


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def json_lines(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Fields of a multipart/form-data body: name -> (file name or None, raw bytes). The standard library's MIME
    parser does this, so the fakes need no form-parsing dependency."""
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True))
    return fields

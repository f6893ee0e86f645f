"""Webhooks never reach inside the network: every internal destination is refused before any connection (no
listener there hears a thing), a redirect is never followed, an allowlisted host is reached, and logs and answers
show the URL's scheme and host only."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from server.core.destinations import DestinationPolicy
from server.main import create_app
from server.services.offload.webhooks import Webhooks


@asynccontextmanager
async def listener(host: str = "127.0.0.1", redirect_to: str | None = None) -> AsyncIterator[tuple[int, list]]:
    """An HTTP server on `host` that records every request; with `redirect_to`, it answers 302 there."""
    heard: list[str] = []

    async def any_request(request: web.Request) -> web.Response:
        heard.append(f"{request.method} {request.path_qs} Host={request.headers.get('host')}")
        if redirect_to:
            return web.Response(status=302, headers={"Location": redirect_to})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1], heard
    finally:
        await runner.cleanup()


def webhooks(sessions=None, **policy) -> Webhooks:
    return Webhooks(
        sessions, secret=None, destinations=DestinationPolicy.from_settings(**policy), attempts=2, backoff_s=0.01
    )


@pytest.mark.parametrize(
    "template",
    ["http://127.0.0.1:{port}/internal-admin", "http://localhost:{port}/hook", "http://[::ffff:127.0.0.1]:{port}/hook"],
)
async def test_a_loopback_destination_is_refused_and_nothing_reaches_it(template, caplog):
    async with listener() as (port, heard):
        url = template.format(port=port) + "?token=SECRET"
        with caplog.at_level(logging.WARNING):
            assert not await webhooks(allow_http=True, allowed_hosts="").post(url, {"event": "x"})
    assert heard == []
    assert "refused" in caplog.text and "SECRET" not in caplog.text and "internal-admin" not in caplog.text


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/", "http://[::1]:9/hook"]
)
async def test_private_metadata_and_ipv6_loopback_destinations_are_refused_before_connecting(url):
    started = asyncio.get_running_loop().time()
    assert not await webhooks(allow_http=True, allowed_hosts="").post(url, {"event": "x"})
    assert asyncio.get_running_loop().time() - started < 1, "refused at once, not after a connection timeout"


async def test_an_allowlisted_host_is_reached_with_its_own_host_header():
    async with listener() as (port, heard):
        assert await webhooks(allow_http=True, allowed_hosts="localhost").post(f"http://localhost:{port}/hook?k=1", {})
    assert heard == [f"POST /hook?k=1 Host=localhost:{port}"]


async def test_a_redirect_to_loopback_is_not_followed(caplog):
    async with listener() as (inner_port, inner_heard):
        async with listener("127.0.0.2", redirect_to=f"http://127.0.0.1:{inner_port}/admin") as (port, heard):
            policy = {"allow_http": True, "allowed_hosts": "127.0.0.2"}
            with caplog.at_level(logging.WARNING):
                assert not await webhooks(**policy).post(f"http://127.0.0.2:{port}/hook", {})
    assert len(heard) == 1, "a redirect is an answer, not retried either"
    assert inner_heard == []
    assert "never followed" in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://10.0.0.1/",
        "http://169.254.169.254/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://localhost/hook",
        "ftp://hooks.example.com/",
        "https://no-such-host.invalid/hook",
        "not a url",
    ],
)
async def test_a_job_with_a_refused_webhook_is_a_422_at_creation(settings, url):
    app = create_app(settings.model_copy(update={"batch_worker": "off", "webhook_allow_http": True}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {"name": "hooked", "provider": "local", "model": "gpt2", "kind": "generate", "webhook_url": url}
            answer = await client.post("/batch/jobs", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "webhook_url"]


async def test_answers_show_a_webhook_without_its_path_or_query(settings):
    app = create_app(
        settings.model_copy(
            update={"batch_worker": "off", "webhook_allow_http": True, "webhook_allowed_hosts": "127.0.0.1"}
        )
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {
                "name": "hooked",
                "provider": "local",
                "model": "gpt2",
                "kind": "generate",
                "webhook_url": "http://127.0.0.1:9/services/T0/B0/SECRET?token=1",
            }
            created = (await client.post("/batch/jobs", json=body)).json()
            listed = (await client.get("/batch/jobs")).json()["items"][0]
    assert created["webhook_url"] == listed["webhook_url"] == "http://127.0.0.1:9"


def test_an_alert_webhook_to_an_internal_address_stops_the_start(settings):
    from pydantic import ValidationError

    from server.core.config import Settings

    with pytest.raises(ValidationError, match="ALERT_WEBHOOK_URL"):
        Settings(_env_file=None, alert_webhook_url="https://169.254.169.254/alert")
    with pytest.raises(ValidationError, match="https"):
        Settings(_env_file=None, alert_webhook_url="http://hooks.example.com/alert")

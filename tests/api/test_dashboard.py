"""`GET /dashboard` without a browser: its Content-Security-Policy, a page that runs only this server's files, the
key question, and the JSON figures it reads that only it needed (`live` in POST /metrics/aggregated). The page in a
real browser: tests/browser/."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import httpx
import pytest

from server.core.config import Settings
from server.main import create_app

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
KEY = {"Authorization": "Bearer s3cret"}


@asynccontextmanager
async def serving(settings: Settings, root_path: str = "", **changes) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"batch_worker": "off", **changes}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, root_path=root_path), base_url="http://test"
        ) as client,
    ):
        yield client


class Page(HTMLParser):
    """What a page makes the browser load or run: script and link URLs, inline scripts, handler attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self.handlers: list[str] = []
        self.body: dict[str, str | None] = {}
        self._in_script = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.handlers += [name for name in attributes if name.startswith("on")]
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]
        if tag == "body":
            self.body = attributes
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";"))}


async def test_the_page_is_served_with_a_policy_that_runs_only_this_servers_scripts(settings):
    async with serving(settings) as client:
        response = await client.get("/dashboard")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = directives(response.headers["content-security-policy"])
    assert policy["default-src"] == ["'none'"] and policy["script-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_the_page_has_no_inline_script_or_handler_and_each_asset_is_served_here(settings):
    async with serving(settings) as client:
        page = Page((await client.get("/dashboard")).text)
        assert page.inline_scripts == [] and page.handlers == []
        assert {url.split("?")[0] for url in page.urls} == {
            "/static/dashboard/favicon.svg",
            "/static/dashboard/dashboard.css",
            "/static/dashboard/dashboard.js",
            "/static/vendor/uplot/uPlot.min.css",
            "/static/vendor/uplot/uPlot.iife.min.js",
        }
        for url in page.urls:
            asset = await client.get(url)
            path = url.split("?")[0]
            assert asset.status_code == 200, url
            assert CONTENT_TYPES[path[path.rfind(".") :]] in asset.headers["content-type"], url
        chart_library = await client.get("/static/vendor/uplot/uPlot.iife.min.js")
        licence = await client.get("/static/vendor/uplot/LICENSE")
    assert len(chart_library.content) > 40_000
    assert chart_library.content.startswith(b"/*! https://github.com/leeoniya/uPlot")
    assert licence.status_code == 200 and licence.text.startswith("The MIT License")


async def test_behind_a_root_path_the_page_asks_under_it(settings):
    async with serving(settings, root_path="/inference") as client:
        page = Page((await client.get("/dashboard")).text)
    assert page.body["data-root"] == "/inference"
    assert page.urls and all(url.startswith("/inference/static/") for url in page.urls)


@pytest.mark.parametrize(("keys", "asks"), [("", "off"), ("s3cret", "required")])
async def test_the_page_asks_for_a_key_only_when_keys_are_on(settings, keys, asks):
    async with serving(settings, api_keys=keys) as client:
        assert Page((await client.get("/dashboard")).text).body["data-keys"] == asks


async def test_the_page_needs_no_key_and_costs_no_quota(settings):
    async with serving(settings, api_keys="s3cret", ingress_rate_limit="1/minute") as client:
        for _ in range(3):
            assert (await client.get("/dashboard")).status_code == 200
        # The one request of the minute is still there for the page's first read.
        assert (await client.get("/metrics/thresholds", headers=KEY)).status_code == 200
        assert (await client.get("/metrics/thresholds", headers=KEY)).status_code == 429


def last_hour() -> dict:
    now = datetime.now(UTC)
    return {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(minutes=1)).isoformat()}


def policy(live: dict, layer: str, name: str) -> dict:
    return next(p for p in live[layer] if p["name"] == name)


async def test_the_aggregated_figures_carry_this_process_queues_batches_and_limits(settings):
    async with serving(settings, ingress_rate_limit="off", ingress_rate_limit_predict="1/minute") as client:
        before = (await client.post("/metrics/aggregated", json=last_hour())).json()["live"]
        statuses = [(await client.post("/predict", json={"text": text})).status_code for text in ("good", "bad")]
        after = (await client.post("/metrics/aggregated", json=last_hour())).json()["live"]
    assert statuses == [200, 429]
    assert [p["name"] for p in after["ingress"]] == ["predict"]
    predict = policy(after, "ingress", "predict")
    assert (predict["count"], predict["period_s"], predict["burst"]) == (1, 60, 1)
    # The registry is the test process's: compare with before.
    assert predict["allowed"] - policy(before, "ingress", "predict")["allowed"] == 1
    assert predict["denied"] - policy(before, "ingress", "predict")["denied"] == 1
    assert [(p["name"], p["count"], p["period_s"]) for p in after["egress"]] == [
        ("gemini", 10, 60),
        ("openai", 60, 60),
        ("anthropic", 50, 60),
    ]
    classifier = after["models"]["classifier"]
    assert classifier["items"] - before["models"]["classifier"]["items"] == 1
    assert classifier["mean_batch_size"] == classifier["items"] / classifier["batches"]
    assert set(after["models"]) == {"generator", "classifier"} and classifier["queue_depth"] == 0


async def test_limits_that_are_off_are_listed_as_none(settings):
    async with serving(settings, ingress_rate_limit="off", egress_rate_limit="") as client:
        live = (await client.post("/metrics/aggregated", json=last_hour())).json()["live"]
    assert live["ingress"] == [] and live["egress"] == []

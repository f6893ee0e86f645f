"""/docs and /redoc load nothing from the internet: their assets come from /static, open to all, never limited."""

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from server.core.config import Settings
from server.main import create_app
from tests.support.metrics import metric

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.fixture
async def guarded(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with API keys on and a tight rate limit: the docs must work for a browser without a key."""
    app = create_app(settings.model_copy(update={"api_keys": "s3cret", "ingress_rate_limit": "2/minute"}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


def referenced_urls(html: str) -> list[str]:
    """Every URL a docs page makes the browser fetch: src/href attributes and the strings passed to the UI."""
    attributes = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
    script_urls = re.findall(r'(?:url|spec-url)\s*[:=]\s*["\']([^"\']+)["\']', html)
    return attributes + script_urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_reference_only_this_servers_assets_and_each_answers(guarded, page):
    response = await guarded.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = referenced_urls(response.text)
    assert "/openapi.json" in urls and any(url.startswith("/static/vendor/") for url in urls)
    assert "//" not in " ".join(urls), urls
    for url in urls:
        asset = await guarded.get(url)
        assert asset.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])


async def test_the_swagger_ui_does_not_ask_the_online_validator(guarded):
    assert "validatorUrl" in (html := (await guarded.get("/docs")).text) and "validator.swagger.io" not in html


async def test_the_vendored_bundles_are_the_real_packages(guarded):
    swagger = await guarded.get("/static/vendor/swagger-ui-dist/swagger-ui-bundle.js")
    redoc = await guarded.get("/static/vendor/redoc/redoc.standalone.js")
    assert len(swagger.content) > 1_000_000 and b"SwaggerUIBundle" in swagger.content
    assert len(redoc.content) > 500_000 and b"Redoc" in redoc.content


async def test_static_files_need_no_key_and_are_not_rate_limited(guarded):
    for _ in range(5):
        for path in (
            "/docs",
            "/redoc",
            "/static/vendor/swagger-ui-dist/swagger-ui.css",
            "/static/vendor/redoc/LICENSE",
        ):
            response = await guarded.get(path)
            assert response.status_code == 200 and "ratelimit" not in response.headers, path
    assert (await guarded.get("/history")).status_code == 401


async def test_a_missing_static_file_is_a_404_not_a_limited_or_key_error(guarded):
    assert (await guarded.get("/static/vendor/absent.js")).status_code == 404


async def test_static_files_revalidate_and_stay_inside_their_folder(guarded):
    url = "/static/vendor/redoc/LICENSE"
    first = await guarded.get(url)
    again = await guarded.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and (await guarded.head(url)).status_code == 200
    for escape in ("/static/..%2f..%2froutes%2fdocs.py", "/static/%2e%2e/%2e%2e/main.py", "/static//etc/passwd"):
        assert (await guarded.get(escape)).status_code == 404, escape


async def test_static_requests_are_labelled_by_their_route_not_as_unmatched(guarded):
    labels = {"method": "GET", "route": "/static/{path:path}", "status": "200"}
    before = metric("http_requests_total", **labels)
    await guarded.get("/static/vendor/swagger-ui-dist/favicon-32x32.png")
    assert metric("http_requests_total", **labels) == before + 1

import asyncio

import httpx
import pytest
import uvicorn

from server.core.config import Settings
from server.main import create_app
from tests.support.metrics import metric
from tests.support.redis import redis_answers_again
from tests.support.servers import free_port


async def open_client(settings: Settings, **overrides):
    app = create_app(settings.model_copy(update=overrides))
    context = app.router.lifespan_context(app)
    await context.__aenter__()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 5000)), base_url="http://test"
    )
    return client, context


@pytest.fixture
async def limited(settings: Settings, request: pytest.FixtureRequest):
    overrides = getattr(request, "param", {})
    client, context = await open_client(settings, **{"ingress_rate_limit": "5/minute", **overrides})
    yield client
    await client.aclose()
    await context.__aexit__(None, None, None)


async def predict(client: httpx.AsyncClient, **kwargs) -> httpx.Response:
    return await client.post("/predict", json={"text": "hello"}, **kwargs)


async def test_the_sixth_quick_request_gets_429_with_retry_after_and_ratelimit_headers(limited):
    responses = [await predict(limited) for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 5 + [429]
    assert [r.headers["ratelimit"] for r in responses[:5]] == [
        f'"default";r={n};t={12 * (5 - n)}' for n in range(4, -1, -1)
    ]
    refused = responses[5]
    assert refused.headers["ratelimit-policy"] == '"default";q=5;w=60'
    assert refused.headers["ratelimit"] == '"default";r=0;t=60'
    assert refused.headers["retry-after"] == "12"
    assert refused.json()["policy"] == "default" and "rate limit exceeded" in refused.json()["detail"]


async def test_every_limited_response_carries_the_headers_even_errors(limited):
    bad = await limited.post("/predict", json={})
    assert bad.status_code == 422 and bad.headers["ratelimit-policy"] == '"default";q=5;w=60'


async def test_open_endpoints_are_never_limited(limited):
    for _ in range(8):
        for path in ("/", "/health", "/metrics", "/docs", "/openapi.json"):
            response = await limited.get(path)
            assert response.status_code == 200 and "ratelimit" not in response.headers


@pytest.mark.parametrize(
    "limited", [{"ingress_rate_limit": "100/minute", "ingress_rate_limit_generate": "1/minute"}], indirect=True
)
async def test_route_policies_add_to_the_client_budget_all_or_nothing(limited):
    body = {"prompts": ["hi"], "max_new_tokens": 1}
    assert (await limited.post("/generate", json=body)).status_code == 200
    refused = await limited.post("/generate", json=body)
    assert refused.status_code == 429 and refused.json()["policy"] == "generate"
    assert refused.headers["ratelimit-policy"] == '"default";q=100;w=60, "generate";q=1;w=60'
    allowed = await predict(limited)
    assert allowed.headers["ratelimit"].startswith('"default";r=98;'), "the refused request consumed nothing"


@pytest.mark.parametrize("limited", [{"ingress_rate_limit": "off"}], indirect=True)
async def test_off_disables_ingress_limits(limited):
    responses = [await predict(limited) for _ in range(10)]
    assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in responses)


@pytest.mark.parametrize("limited", [{"ingress_rate_limit": "1/minute", "api_keys": "alpha,beta"}], indirect=True)
async def test_each_api_key_has_its_own_budget(limited):
    alpha, beta = ({"Authorization": f"Bearer {key}"} for key in ("alpha", "beta"))
    assert (await predict(limited, headers=alpha)).status_code == 200
    assert (await predict(limited, headers=alpha)).status_code == 429
    assert (await predict(limited, headers=beta)).status_code == 200


async def test_redis_failure_fails_open_or_closed(settings, redis_server):
    for mode, expected in (("open", 200), ("closed", 503)):
        client, context = await open_client(
            settings, ingress_rate_limit="5/minute", redis_url=redis_server.url, rate_limit_fail_mode=mode
        )
        assert (await predict(client)).status_code == 200
        redis_server.stop()
        errors = metric("rate_limit_errors_total", layer="ingress")
        response = await predict(client)
        assert response.status_code == expected
        assert metric("rate_limit_errors_total", layer="ingress") == errors + 1
        redis_server.start()
        await redis_answers_again(client)
        assert (await predict(client)).status_code == 200
        await client.aclose()
        await context.__aexit__(None, None, None)


@pytest.mark.parametrize("trusted, separate_buckets", [("127.0.0.1", True), ("192.0.2.1", False)])
async def test_x_forwarded_for_counts_only_from_trusted_proxies(settings, trusted, separate_buckets):
    """Over real HTTP: uvicorn resolves the client from X-Forwarded-For only for peers in FORWARDED_ALLOW_IPS."""
    app = create_app(settings.model_copy(update={"ingress_rate_limit": "1/minute"}))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=True, forwarded_allow_ips=trusted
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            first = await client.post("/predict", json={"text": "a"}, headers={"X-Forwarded-For": "198.51.100.1"})
            spoofed = await client.post("/predict", json={"text": "a"}, headers={"X-Forwarded-For": "198.51.100.2"})
        assert first.status_code == 200
        assert spoofed.status_code == (200 if separate_buckets else 429)
    finally:
        server.should_exit = True
        await serving

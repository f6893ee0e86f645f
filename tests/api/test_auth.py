import hashlib

import httpx
import pytest

from server.core.config import Settings
from server.main import create_app


@pytest.fixture
async def secured(settings: Settings, request: pytest.FixtureRequest):
    hashed = "sha256:" + hashlib.sha256(b"hashed-secret").hexdigest()
    overrides = {"api_keys": f"plain-secret, {hashed}", **getattr(request, "param", {})}
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic plain-secret"}, {"Authorization": "plain-secret"}],
)
async def test_missing_or_wrong_keys_get_401_with_www_authenticate(secured, headers):
    for method, path, body in (
        ("POST", "/generate", {"prompts": ["x"], "max_new_tokens": 1}),
        ("POST", "/predict", {"text": "x"}),
        ("GET", "/history", None),
    ):
        response = await secured.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]


@pytest.mark.parametrize("key", ["plain-secret", "hashed-secret"])
async def test_right_keys_plain_or_hashed_pass(secured, key):
    response = await secured.post("/predict", json={"text": "x"}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200


async def test_health_metrics_root_and_docs_stay_open(secured):
    for path in ("/", "/health", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert (await secured.get(path)).status_code == 200, path


@pytest.mark.parametrize("secured", [{"metrics_require_key": True}], indirect=True)
async def test_metrics_can_require_a_key(secured):
    assert (await secured.get("/metrics")).status_code == 401
    assert (await secured.get("/metrics", headers={"Authorization": "Bearer plain-secret"})).status_code == 200


async def test_no_keys_runs_open_with_a_startup_warning(settings, caplog):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.post("/predict", json={"text": "x"})).status_code == 200
    assert "no API key is set: the server is OPEN" in caplog.text


@pytest.mark.parametrize("secured", [{"ingress_rate_limit": "2/minute"}], indirect=True)
async def test_tries_without_a_valid_key_stay_401_and_do_not_use_up_the_quota(secured):
    # A client that forgot its key is told so every time, not 429 once its tries pass the limit; the key's own
    # quota is untouched by them.
    for _ in range(5):
        refused = await secured.post("/predict", json={"text": "x"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    keyed = [
        await secured.post("/predict", json={"text": "x"}, headers={"Authorization": "Bearer plain-secret"})
        for _ in range(3)
    ]
    assert [response.status_code for response in keyed] == [200, 200, 429]


async def test_the_openai_api_answers_a_missing_key_in_its_own_shape(secured):
    refused = await secured.post("/v1/completions", json={"model": "x", "prompt": "x"})
    assert refused.status_code == 401
    assert "API key" in refused.json()["error"]["message"]


async def test_health_without_a_key_says_states_but_no_details(secured):
    anonymous = (await secured.get("/health")).json()
    assert anonymous["checks"]["database"]["status"] == "ok"
    assert all(check["detail"] == {} for check in anonymous["checks"].values())
    keyed = (await secured.get("/health", headers={"Authorization": "Bearer plain-secret"})).json()
    assert keyed["checks"]["models"]["detail"]["generator"]["name"]
    live = (await secured.get("/health/live")).json()
    assert all(check["detail"] == {} for check in live["checks"].values())

import asyncio

import httpx
import pytest

from server.core.config import Settings
from server.main import create_app
from tests.support.metrics import metric
from tests.support.redis import redis_answers_again


@pytest.fixture(params=["memory", "redis"])
async def client(request: pytest.FixtureRequest, settings: Settings):
    overrides = {"redis_url": request.getfixturevalue("redis_server").url} if request.param == "redis" else {}
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            client.app = app
            yield client


def computed() -> float:
    return metric("model_items_total", model="generator")


async def test_second_identical_request_is_a_hit_and_skips_the_model(client):
    body = {"prompts": ["Cache me"], "max_new_tokens": 5}
    first = await client.post("/generate", json=body)
    assert first.headers["x-cache"] == "MISS" and first.json()[0]["cached"] is False
    before = computed()
    second = await client.post("/generate", json=body)
    assert second.headers["x-cache"] == "HIT" and second.json()[0]["cached"] is True
    assert second.json()[0]["completion"] == first.json()[0]["completion"]
    assert second.json()[0]["id"] != first.json()[0]["id"]
    assert computed() == before


async def test_cache_is_per_prompt_so_requests_can_be_partial_hits(client):
    await client.post("/generate", json={"prompts": ["one", "two"], "max_new_tokens": 3})
    before = computed()
    response = await client.post("/generate", json={"prompts": ["two", "three", "one"], "max_new_tokens": 3})
    assert response.headers["x-cache"] == "PARTIAL"
    assert [item["cached"] for item in response.json()] == [True, False, True]
    assert computed() == before + 1


async def test_parameters_are_part_of_the_key(client):
    await client.post("/generate", json={"prompts": ["same"], "max_new_tokens": 3})
    other = await client.post("/generate", json={"prompts": ["same"], "max_new_tokens": 4})
    assert other.headers["x-cache"] == "MISS"


async def test_sampling_without_a_seed_is_never_cached_and_with_a_seed_is(client):
    body = {"prompts": ["Sample me"], "max_new_tokens": 5, "temperature": 1.0}
    before = computed()
    for _ in range(2):
        assert (await client.post("/generate", json=body)).headers["x-cache"] == "MISS"
    assert computed() == before + 2
    seeded = {**body, "seed": 3}
    await client.post("/generate", json=seeded)
    assert (await client.post("/generate", json=seeded)).headers["x-cache"] == "HIT"


async def test_predictions_are_cached_per_text(client):
    await client.post("/predict", json={"text": "lovely"})
    response = await client.post("/predict", json={"texts": ["lovely", "dreadful"]})
    assert response.headers["x-cache"] == "PARTIAL"
    assert [item["cached"] for item in response.json()] == [True, False]


async def test_clients_cannot_force_a_recompute_unless_allowed(client):
    body = {"prompts": ["Pinned"], "max_new_tokens": 3}
    await client.post("/generate", json=body)
    forced = await client.post("/generate", json=body, headers={"Cache-Control": "no-cache"})
    assert forced.headers["x-cache"] == "HIT"
    client.app.state.runtime.settings.cache_allow_client_bypass = True
    before = computed()
    forced = await client.post("/generate", json=body, headers={"Cache-Control": "no-cache"})
    assert forced.headers["x-cache"] == "MISS" and computed() == before + 1


async def test_cached_answers_are_recorded_as_such(client):
    body = {"prompts": ["Recorded"], "max_new_tokens": 3}
    await client.post("/generate", json=body)
    await client.post("/generate", json=body)
    await client.app.state.runtime.recorder.flush()
    items = (await client.get("/history", params={"limit": 2})).json()["items"]
    assert [item["cached"] for item in items] == [True, False]


async def test_redis_outage_serves_every_request_reports_degraded_and_recovers(settings, redis_server):
    app = create_app(settings.model_copy(update={"redis_url": redis_server.url}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            health = (await client.get("/health")).json()
            assert health["status"] == "ok" and health["checks"]["redis"]["status"] == "ok"
            body = {"prompts": ["Outage"], "max_new_tokens": 3}
            await client.post("/generate", json=body)

            async def burst(n: int) -> list[httpx.Response]:
                return await asyncio.gather(
                    *(
                        client.post("/generate", json={"prompts": [f"Outage {i % 5}"], "max_new_tokens": 3})
                        for i in range(n)
                    )
                )

            redis_server.stop()
            during = await burst(30)
            assert [r.status_code for r in during] == [200] * 30
            assert (await client.post("/generate", json=body)).status_code == 200
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "degraded" and health.json()["checks"]["redis"]["status"] == "degraded"
            redis_server.start()
            await redis_answers_again(client)
            assert (await client.post("/generate", json=body)).headers["x-cache"] == "MISS"
            assert (await client.post("/generate", json=body)).headers["x-cache"] == "HIT"
            assert (await client.get("/health")).json()["checks"]["redis"]["status"] == "ok"

import httpx
import pytest

from server.main import create_app
from tests.support.servers import PostgresServer


async def test_root_describes_the_app_and_models(app_client):
    body = (await app_client.get("/")).json()
    assert body["name"] and body["version"]
    assert body["models"]["generator"]["offline_stand_in"] is True
    assert body["models"]["sentiment"]["name"].startswith("offline-stand-in:")


async def test_docs_and_openapi_are_served(app_client):
    assert (await app_client.get("/docs")).status_code == 200
    assert (await app_client.get("/redoc")).status_code == 200
    assert "/generate" in (await app_client.get("/openapi.json")).json()["paths"]


async def test_health_lists_each_check(app_client):
    response = await app_client.get("/health")
    assert response.status_code == 200
    checks = response.json()["checks"]
    assert checks["models"]["status"] == "ok" and checks["database"]["status"] == "ok"
    assert checks["database"]["latency_ms"] >= 0


async def test_metrics_are_prometheus_text_with_model_and_http_series(app_client):
    await app_client.post("/generate", json={"prompts": ["hi"], "max_new_tokens": 2})
    response = await app_client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    for series in (
        "model_batches_total",
        "model_items_total",
        "model_batch_size_bucket",
        "scheduler_queue_wait_seconds_bucket",
        "http_requests_total",
        "http_request_duration_seconds_bucket",
    ):
        assert series in response.text
    assert 'http_requests_total{method="POST",route="/generate",status="200"}' in response.text


@pytest.mark.postgres
async def test_health_is_503_when_the_database_is_down(settings, tmp_path):
    server = PostgresServer().start()
    try:
        app = create_app(settings.model_copy(update={"database_url": server.url()}))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.get("/health")).status_code == 200
                server.stop()
                down = await client.get("/health")
                assert down.status_code == 503
                assert down.json()["checks"]["database"]["status"] == "down"
                assert down.json()["checks"]["models"]["status"] == "ok"
                server.start()
                assert (await client.get("/health")).status_code == 200
    finally:
        server.destroy()

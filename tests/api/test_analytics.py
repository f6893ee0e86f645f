"""The analytics routes end to end: records of answered and failed requests, aggregation, thresholds, the report
(fallback without a key, Gemini with the fake), cache administration and admin keys."""

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from server.core.config import Settings
from server.db.analytics_models import RequestRecord
from server.main import create_app
from server.services.analytics.thresholds import audit_trail
from tests.fakes import FakeGemini

ADMIN, USER = {"Authorization": "Bearer admin-key"}, {"Authorization": "Bearer user-key"}


@pytest.fixture
async def keyed(settings: Settings, database_url: str):
    """The app with an ordinary and an admin key, and blocked terms to fail a request on purpose."""
    app = create_app(
        settings.model_copy(
            update={
                "database_url": database_url,
                "batch_worker": "off",
                "api_keys": "user-key",
                "admin_api_keys": "admin-key",
                "blocked_terms": "forbidden",
            }
        )
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        client.app = app
        yield client


def window() -> dict:
    now = datetime.now(UTC)
    return {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(minutes=1)).isoformat()}


async def test_answered_and_failed_requests_are_aggregated(keyed):
    generated = await keyed.post("/generate", headers=USER, json={"prompts": ["a", "b"], "max_new_tokens": 2})
    assert generated.status_code == 200
    assert (await keyed.post("/predict", headers=USER, json={"texts": ["good", "bad", "good"]})).status_code == 200
    assert (await keyed.post("/generate", headers=USER, json={"prompts": ["forbidden"]})).status_code == 400
    assert await keyed.app.state.runtime.recorder.flush()

    count = await keyed.get("/metrics/count", headers=USER)
    assert count.json() == {"predictions": 3, "generations": 2, "total": 5}
    runtime = keyed.app.state.runtime
    assert (await keyed.get("/metrics/count", headers=USER, params={"model": runtime.classifier.name})).json() == {
        "predictions": 3,
        "generations": 0,
        "total": 3,
    }

    answer = (await keyed.post("/metrics/aggregated", headers=USER, json=window() | {"bucket": "day"})).json()
    total = answer["total"]
    # The blocked prompt (400) is the client's mistake: a request, not a server error.
    assert (total["requests"], total["items"], total["errors"]) == (3, 5, 0)
    assert total["error_rate"] == 0
    assert total["cache_hit_ratio"] == pytest.approx(1 / 5)  # the second "good" was computed once, for both
    assert total["latency_ms"]["p50"] is not None and total["tokens_out"] == 4
    assert "error_rate" not in [b["threshold"] for b in answer["breaches"]]
    async with runtime.sessions() as session:
        failed = (await session.scalars(select(RequestRecord).where(RequestRecord.status >= 400))).all()
    assert [(r.endpoint, r.status, r.error, r.items) for r in failed] == [("generate", 400, "BlockedPrompt", 0)]
    generate = (
        await keyed.post(
            "/metrics/aggregated", headers=USER, json=window() | {"bucket": "minute", "endpoint": "generate"}
        )
    ).json()
    assert (generate["total"]["requests"], generate["total"]["errors"]) == (2, 0)


async def test_requests_refused_before_their_service_are_recorded_once(keyed):
    assert (await keyed.post("/generate", headers=USER, json={"prompts": []})).status_code == 422
    assert (await keyed.post("/predict", json={"text": "no key"})).status_code == 401
    too_big = b'{"text": "' + b"x" * 2_000_000 + b'"}'
    assert (await keyed.post("/predict", headers=USER, content=too_big)).status_code == 413
    assert (await keyed.post("/generate", headers=USER, json={"prompts": ["forbidden"]})).status_code == 400
    assert (await keyed.post("/predict", headers=USER, json={"text": "fine"})).status_code == 200
    assert await keyed.app.state.runtime.recorder.flush()
    async with keyed.app.state.runtime.sessions() as session:
        records = (await session.scalars(select(RequestRecord).order_by(RequestRecord.created_at))).all()
    assert [(r.endpoint, r.status, r.error) for r in records] == [
        ("generate", 422, "InvalidRequest"),
        ("predict", 401, "Unauthorized"),
        ("predict", 413, "BodyTooLarge"),
        ("generate", 400, "BlockedPrompt"),
        ("predict", 200, None),
    ]
    own = (await keyed.post("/metrics/aggregated", headers=USER, json=window() | {"bucket": "day"})).json()["total"]
    # 422, 413 and 400 are the client's mistakes: requests, not server errors.
    assert (own["requests"], own["errors"]) == (4, 0), "the request without a key is nobody's tenant's"
    every = (await keyed.post("/metrics/aggregated", headers=ADMIN, json=window() | {"bucket": "day"})).json()["total"]
    assert (every["requests"], every["errors"]) == (5, 0)


@pytest.mark.parametrize(
    "body",
    [
        {"start": "2026-11-24T10:00:00Z", "end": "2026-11-24T09:00:00Z"},
        {"start": "2026-11-24T10:00:00", "end": "2026-11-24T11:00:00"},
        {"start": "2026-11-24T10:00:00Z", "end": "2026-11-24T11:00:00Z", "bucket": "week"},
    ],
)
async def test_nonsense_windows_are_refused(keyed, body):
    assert (await keyed.post("/metrics/aggregated", headers=USER, json=body)).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"p95_latency_ms": -1},
        {"error_rate": 1.5},
        {"min_cache_hit_ratio": -0.1},
        {"max_queue_depth": -3},
        {"p95_latency_ms": "fast"},
        {"unknown": 1},
    ],
)
async def test_nonsense_thresholds_are_refused(keyed, body):
    assert (await keyed.put("/metrics/thresholds", headers=ADMIN, json=body)).status_code == 422


async def test_thresholds_are_stored_and_audited_with_the_key_id(keyed):
    assert (await keyed.get("/metrics/thresholds", headers=USER)).json()["p95_latency_ms"] == 1000
    assert (await keyed.put("/metrics/thresholds", headers=USER, json={"p95_latency_ms": 200})).status_code == 403
    changed = await keyed.put("/metrics/thresholds", headers=ADMIN, json={"p95_latency_ms": 200, "error_rate": 0.05})
    assert changed.status_code == 200 and changed.json()["updated"] == ["p95_latency_ms"]
    assert (await keyed.get("/metrics/thresholds", headers=USER)).json()["p95_latency_ms"] == 200
    [entry] = await audit_trail(keyed.app.state.runtime.sessions)
    assert entry["changes"] == {"p95_latency_ms": [1000.0, 200.0]}
    assert entry["key_id"].startswith("key:") and "admin-key" not in entry["key_id"]


async def test_admin_operations_need_an_admin_key(keyed):
    for method, path, body in (
        ("PUT", "/metrics/thresholds", {}),
        ("DELETE", "/cache", None),
        ("POST", "/batch/scheduler", {"running": False}),
    ):
        assert (await keyed.request(method, path, json=body)).status_code == 401
        assert (await keyed.request(method, path, headers=USER, json=body)).status_code == 403
        assert (await keyed.request(method, path, headers=ADMIN, json=body)).status_code == 200
    assert (await keyed.post("/predict", headers=ADMIN, json={"text": "admins may predict"})).status_code == 200


async def test_cache_entries_are_counted_and_removed_by_endpoint_and_model(keyed):
    runtime = keyed.app.state.runtime
    await keyed.post("/predict", headers=USER, json={"texts": ["one", "two"]})
    await keyed.post("/generate", headers=USER, json={"prompts": ["three"], "max_new_tokens": 2})
    await keyed.post("/predict", headers=USER, json={"text": "one"})
    stats = (await keyed.get("/cache", headers=USER)).json()
    assert stats["entries"] == 3 and stats["hit_ratio"] == pytest.approx(1 / 4)
    assert (await keyed.get("/cache", headers=USER, params={"endpoint": "predict"})).json()["entries"] == 2
    removed = await keyed.delete("/cache", headers=ADMIN, params={"endpoint": "predict", "model": "another-model"})
    assert removed.json() == {"removed": 0}
    removed = await keyed.delete(
        "/cache", headers=ADMIN, params={"endpoint": "predict", "model": runtime.classifier.name}
    )
    assert removed.json() == {"removed": 2}
    assert (await keyed.get("/cache", headers=USER)).json()["entries"] == 1
    # The configured id (GENERATOR_MODEL, here "gpt2") names the served model, stand-in or not.
    assert runtime.generator.name != runtime.settings.generator_model
    by_plain_name = await keyed.delete("/cache", headers=ADMIN, params={"model": runtime.settings.generator_model})
    assert by_plain_name.json() == {"removed": 1}


async def test_without_a_gemini_key_the_report_is_a_fallback_at_once(keyed):
    answer = await keyed.post("/analyze/performance", headers=USER, json={})
    assert answer.status_code == 200
    report = answer.json()
    assert (report["source"], report["reason"], report["cached"]) == ("fallback", "no_key", False)
    assert report["summary"] and report["model"] == "gemini-2.5-flash-lite"
    assert (await keyed.post("/analyze/performance", headers=USER)).status_code == 200  # no body at all


async def test_with_gemini_the_report_is_written_by_it(settings, database_url):
    """The second report is the first one's, from the cache: its key is the digest of the measured data, so no
    record may be written between the two (the tests' 20 ms flush once wrote the first request's record in between,
    and the second report, on new data, was a new one)."""
    with FakeGemini().serve() as fake:
        app = create_app(
            settings.model_copy(
                update={
                    "database_url": database_url,
                    "batch_worker": "off",
                    "gemini_api_key": "k",
                    "gemini_base_url": fake.base_url,
                    "record_flush_interval_ms": 60_000.0,
                }
            )
        )
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
        ):
            first = (await client.post("/analyze/performance", json={"focus": "latency"})).json()
            second = (await client.post("/analyze/performance", json={"focus": "latency"})).json()
            assert (await client.get("/cache", params={"endpoint": "analyze"})).json()["entries"] == 1
        assert (first["source"], first["cached"], second["cached"]) == ("gemini", False, True)
        assert len(fake.calls("POST", r"/v1beta/models/gemini-2.5-flash-lite:generateContent")) == 1

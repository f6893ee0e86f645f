"""Batch offload on the local models: jobs, the single-item queue, Prefer: respond-async, cancel, savings."""

import httpx
import pytest

from server.core.config import Settings
from server.main import create_app
from server.services.batch.pricing import PriceTable
from tests.support.metrics import metric


@pytest.fixture
async def client(settings: Settings, database_url: str):
    app = create_app(settings.model_copy(update={"database_url": database_url, "batch_worker": "off"}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            client.app = app
            yield client


def prompt(custom_id: str, text: str) -> dict:
    return {"custom_id": custom_id, "body": {"prompt": text, "max_tokens": 4}}


async def test_a_local_job_runs_to_completion_with_savings_against_the_reference_price(client):
    runtime = client.app.state.runtime
    body = {"name": "local", "provider": "local", "model": "gpt2", "kind": "generate", "schedule": "now",
            "requests": [prompt("a", "The cat"), prompt("b", "Once upon a time"), prompt("c", "The weather")]}
    job = (await client.post("/batch/jobs", json=body)).json()
    report = await runtime.batch.run_once()
    assert report.submitted_jobs == 1 and report.finished_jobs == [job["id"]]
    done = (await client.get(f"/batch/jobs/{job['id']}")).json()
    assert done["status"] == "completed" and done["counts"] == {"total": 3, "succeeded": 3, "failed": 0, "pending": 0}
    responses = (await client.get(f"/batch/jobs/{job['id']}/responses")).json()["items"]
    assert [r["custom_id"] for r in responses] == ["a", "b", "c"]
    direct = (await client.post("/generate", json={"prompts": ["The cat"], "max_new_tokens": 4})).json()[0]
    assert responses[0]["output"]["text"] == direct["completion"]
    usage = done["usage"]
    assert usage["output_tokens"] == 12 and usage["input_tokens"] == sum(r["usage"]["input_tokens"] for r in responses)
    expected = PriceTable.load(local_reference="openai:gpt-4o-mini").cost("local", "gpt2", usage["input_tokens"],
                                                                        usage["output_tokens"])
    assert done["cost_usd"] == 0 and done["savings_usd"] == pytest.approx(expected.savings_usd)
    assert (await runtime.batch.run_once()).finished_jobs == []
    lines = (await client.get(f"/batch/jobs/{job['id']}/responses", params={"format": "jsonl"})).text.splitlines()
    assert len(lines) == 3


async def test_queued_items_wait_for_the_window_until_processed(client):
    runtime = client.app.state.runtime
    item = {"job_type": "nightly", "provider": "local", "model": "sst2", "kind": "predict", "data": {"text": "great"}}
    first = await client.post("/batch/queue", json=item)
    assert first.status_code == 202 and first.headers["location"] == f"/batch/items/{first.json()['item_id']}"
    more = (await client.post("/batch/queue/bulk", json={"items": [item, {**item, "job_type": "other"}]})).json()
    assert more[0]["job_id"] == first.json()["job_id"] != more[1]["job_id"]
    status = (await client.get("/batch/queue/status")).json()
    assert status == {"waiting": 3, "by_job_type": {"nightly": 2, "other": 1}, "by_provider": {"local": 3},
                      "by_priority": {"5": 3}}
    assert (await runtime.batch.run_once()).submitted_jobs == 0
    processed = (await client.post("/batch/process", json={"job_type": "nightly"})).json()
    assert processed["job_ids"] == [first.json()["job_id"]]
    await runtime.batch.run_once()
    done = (await client.get(first.headers["location"])).json()
    assert done["status"] == "succeeded" and set(done["output"]) == {"label", "score"}
    assert (await client.get("/batch/queue/status")).json()["waiting"] == 1
    assert (await client.post("/batch/process/all")).json()["job_ids"] == [more[1]["job_id"]]


async def test_prefer_respond_async_answers_202_and_the_item_runs_in_the_background(client):
    runtime = client.app.state.runtime
    deferred = await client.post("/generate", json={"prompts": ["The cat", "A dog"], "max_new_tokens": 3},
                                 headers={"Prefer": "respond-async, wait=0"})
    assert deferred.status_code == 202 and deferred.headers["preference-applied"] == "respond-async"
    items = deferred.json()
    assert deferred.headers["location"] == items[0]["url"] and len(items) == 2
    assert (await client.get(items[0]["url"])).json()["status"] == "queued"
    background = metric("batch_background_items_total", model="generator")
    await runtime.batch.run_once()
    outputs = [(await client.get(item["url"])).json() for item in items]
    assert all(o["status"] == "succeeded" and o["usage"]["output_tokens"] == 3 for o in outputs)
    direct = (await client.post("/generate", json={"prompts": ["A dog"], "max_new_tokens": 3})).json()[0]
    assert outputs[1]["output"]["text"] == direct["completion"]
    assert metric("batch_background_items_total", model="generator") == background + 2
    predicted = await client.post("/predict", json={"text": "fine"}, headers={"Prefer": "respond-async"})
    assert predicted.status_code == 202
    refused = await client.post("/generate", json={"prompts": ["x" * 5000]}, headers={"Prefer": "respond-async"})
    assert refused.status_code == 422


async def test_cancel_keeps_finished_items_and_is_refused_once_final(client):
    runtime = client.app.state.runtime
    body = {"name": "c", "provider": "local", "model": "gpt2", "kind": "generate",
            "requests": [prompt("a", "one"), prompt("b", "two")]}
    job = (await client.post("/batch/jobs", json=body)).json()
    cancelled = (await client.post(f"/batch/jobs/{job['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["failed"] == 2
    again = await client.post(f"/batch/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert (await client.post(f"/batch/jobs/{job['id']}/submit")).status_code == 409
    assert (await runtime.batch.run_once()).submitted_jobs == 0


async def test_submit_now_runs_a_window_job_at_the_next_tick(client):
    runtime = client.app.state.runtime
    body = {"name": "w", "provider": "local", "model": "gpt2", "kind": "generate", "requests": [prompt("a", "x")]}
    job = (await client.post("/batch/jobs", json=body)).json()
    assert (await runtime.batch.run_once()).submitted_jobs == 0
    assert (await client.post(f"/batch/jobs/{job['id']}/submit")).json()["schedule"] == "now"
    await runtime.batch.run_once()
    assert (await client.get(f"/batch/jobs/{job['id']}")).json()["status"] == "completed"
    scheduler = (await client.get("/batch/scheduler")).json()
    assert scheduler["running"] is False and scheduler["schedule"] == "0 2 * * *"

"""The batch jobs API: create, list, read, change, delete; requests (idempotent on custom_id) and responses."""

import json

import pytest


def request(custom_id: str, text: str = "hello") -> dict:
    return {"custom_id": custom_id, "body": {"prompt": text, "max_tokens": 5}}


JOB = {"name": "nightly", "provider": "local", "model": "gpt2", "kind": "generate", "job_type": "scoring"}


async def test_create_read_list_and_filter_jobs(client):
    created = await client.post("/batch/jobs", json={**JOB, "requests": [request("a"), request("b")]})
    assert created.status_code == 201
    job = created.json()
    assert created.headers["location"] == f"/batch/jobs/{job['id']}"
    assert job["status"] == "queued" and job["schedule"] == "window" and job["priority"] == 5
    assert job["counts"] == {"total": 2, "succeeded": 0, "failed": 0, "pending": 2}
    assert (await client.get(f"/batch/jobs/{job['id']}")).json() == job
    other = (await client.post("/batch/jobs", json={**JOB, "kind": "predict", "job_type": "other"})).json()
    listed = (await client.get("/batch/jobs")).json()
    assert [j["id"] for j in listed["items"]] == [other["id"], job["id"]] and listed["next_cursor"] is None
    assert [j["id"] for j in (await client.get("/batch/jobs", params={"job_type": "scoring"})).json()["items"]] == [
        job["id"]
    ]
    assert (await client.get("/batch/jobs", params={"provider": "openai"})).json()["items"] == []
    first = (await client.get("/batch/jobs", params={"limit": 1})).json()
    second = (await client.get("/batch/jobs", params={"limit": 1, "cursor": first["next_cursor"]})).json()
    assert [j["id"] for j in first["items"] + second["items"]] == [other["id"], job["id"]]
    assert second["next_cursor"] is None
    assert (await client.get("/batch/jobs", params={"cursor": "garbage"})).status_code == 422
    assert (await client.get("/batch/jobs/nope")).status_code == 404


@pytest.mark.parametrize(
    "body, where",
    [
        ({**JOB, "provider": "anthropic"}, "provider"),
        ({**JOB, "kind": "chat"}, "kind"),
        ({**JOB, "priority": 11}, "priority"),
        ({**JOB, "schedule": "later"}, "schedule"),
        ({**JOB, "requests": [request("bad id!")]}, "custom_id"),
        ({**JOB, "requests": [request("x"), request("x")]}, "custom_id"),
        ({**JOB, "requests": [{"custom_id": "x", "body": {"text": "not a prompt"}}]}, "body"),
    ],
)
async def test_bad_jobs_are_422_naming_the_field(client, body, where):
    response = await client.post("/batch/jobs", json=body)
    assert response.status_code == 422, response.text
    assert any(where in map(str, error["loc"]) for error in response.json()["detail"])


async def test_requests_are_idempotent_on_custom_id(client):
    job = (await client.post("/batch/jobs", json={**JOB, "requests": [request("a")]})).json()
    url = f"/batch/jobs/{job['id']}/requests"
    added = await client.post(url, json={"requests": [request("a"), request("b")]})
    assert added.json() == {"added": 1, "unchanged": 1}
    assert (await client.post(url, json={"requests": [request("b")]})).json() == {"added": 0, "unchanged": 1}
    clash = await client.post(url, json={"requests": [request("c"), request("a", "another body")]})
    assert clash.status_code == 409 and "'a'" in clash.json()["detail"]
    listed = (await client.get(url)).json()
    assert [item["custom_id"] for item in listed["items"]] == ["a", "b"]
    assert all(item["status"] == "queued" and item["attempts"] == 0 for item in listed["items"])
    page = (await client.get(url, params={"limit": 1})).json()
    rest = (await client.get(url, params={"limit": 1, "cursor": page["next_cursor"]})).json()
    assert [i["custom_id"] for i in page["items"] + rest["items"]] == ["a", "b"]
    item = listed["items"][0]
    assert (await client.get(f"/batch/items/{item['id']}")).json() == item
    assert (await client.get("/batch/items/nope")).status_code == 404
    assert (await client.get(f"/batch/jobs/{job['id']}/responses")).json() == {"items": [], "next_cursor": None}


async def test_only_a_queued_job_changes_and_an_in_flight_job_is_not_deleted(client):
    job = (await client.post("/batch/jobs", json={**JOB, "requests": [request("a")]})).json()
    url = f"/batch/jobs/{job['id']}"
    changed = (await client.patch(url, json={"priority": 9, "schedule": "now", "name": "urgent"})).json()
    assert (changed["priority"], changed["schedule"], changed["name"]) == (9, "now", "urgent")
    assert (await client.patch(url, json={})).status_code == 422
    assert (await client.patch(url, json={"model": "other"})).status_code == 422
    jobs = client.app.state.runtime.batch.jobs
    assert await jobs.transition(job["id"], ["queued"], "submitted")
    assert not await jobs.transition(job["id"], ["queued"], "submitted")
    assert (await client.patch(url, json={"priority": 1})).status_code == 409
    assert (await client.post(f"{url}/requests", json={"requests": [request("b")]})).status_code == 409
    refused = await client.delete(url)
    assert refused.status_code == 409 and "cancel" in refused.json()["detail"]
    assert await jobs.transition(job["id"], ["submitted"], "cancelled")
    assert (await client.delete(url)).status_code == 204
    assert (await client.get(url)).status_code == 404


@pytest.mark.parametrize(
    "body, where",
    [
        ({**JOB, "name": "nul\u0000name"}, "name"),
        ({**JOB, "priority": "5"}, "priority"),
        ({**JOB, "metadata": {"ratio": float("nan")}}, "metadata"),
        ({**JOB, "requests": [{"custom_id": "a", "body": {"prompt": "lone \ud800 surrogate"}}]}, "body"),
        ({**JOB, "requests": [{"custom_id": "a", "body": {"prompt": "x", "temperature": float("inf")}}]}, "body"),
    ],
)
async def test_batch_bodies_are_strict_finite_and_storable(client, body, where):
    response = await client.post(
        "/batch/jobs", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert any(where in map(str, error["loc"]) for error in response.json()["detail"])

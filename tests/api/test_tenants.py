"""Tenants end to end: for every route of /openapi.json that reads or changes stored data, tenant B never sees,
changes or deletes tenant A's data (lists empty or filtered, ids 404) and an admin sees both; routes that hold no
tenant data say why. A route missing from `ROUTES` fails the walk, so a new route must be classified."""

import csv
import hashlib
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from server.core.config import Settings
from server.services.serving.generation import GenerationOptions
from tests.support.app import serving

A, B, ADMIN = ({"Authorization": f"Bearer {key}"} for key in ("alpha-key", "beta-key", "ops-key"))
KEYS = f"""
[[keys]]
tenant = "alpha"
key = "alpha-key"
grants = ["openai"]

[[keys]]
tenant = "beta"
key = "sha256:{hashlib.sha256(b"beta-key").hexdigest()}"

[[keys]]
tenant = "ops"
key = "ops-key"
role = "admin"
"""


@dataclass
class World:
    """The app, and what tenant A stored before the walk."""

    client: httpx.AsyncClient
    model: str = ""
    generation_id: str = ""
    prediction_id: str = ""
    queued_job: str = ""
    finished_job: str = ""
    paid_job: str = ""
    item_id: str = ""
    file_id: str = ""
    v1_batch: str = ""
    seen: dict = field(default_factory=dict)

    async def call(self, method: str, path: str, headers: dict, **kwargs) -> httpx.Response:
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def job(self, job_id: str) -> dict:
        return (await self.call("GET", f"/batch/jobs/{job_id}", A)).json()


def tenant_settings(settings: Settings, tmp_path: Path, **changes) -> Settings:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    return settings.model_copy(
        update={
            "api_keys_file": keys,
            "batch_worker": "off",
            "openai_api_key": "sk-test",
            "openai_base_url": "http://127.0.0.1:9/v1",
            **changes,
        }
    )


def window() -> dict:
    now = datetime.now(UTC)
    return {
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(minutes=1)).isoformat(),
        "bucket": "day",
    }


async def seed(world: World) -> None:
    call = world.call
    world.model = (await call("GET", "/v1/models", A)).json()["data"][0]["id"]
    generated = await call("POST", "/generate", A, json={"prompts": ["alpha's secret prompt"], "max_new_tokens": 2})
    assert generated.status_code == 200, generated.text
    world.generation_id = generated.json()[0]["id"]
    world.prediction_id = (await call("POST", "/predict", A, json={"text": "alpha's secret text"})).json()["id"]
    completion = await call(
        "POST",
        "/v1/completions",
        A,
        json={"model": world.model, "prompt": "alpha completes", "max_tokens": 2, "temperature": 0},
    )
    assert completion.status_code == 200, completion.text
    requests = [{"custom_id": "one", "body": {"prompt": "alpha batch", "max_tokens": 2}}]
    job = {"name": "alpha's job", "provider": "local", "model": "gpt2", "kind": "generate", "requests": requests}
    world.queued_job = (await call("POST", "/batch/jobs", A, json=job)).json()["id"]
    world.finished_job = (await call("POST", "/batch/jobs", A, json=job | {"schedule": "now"})).json()["id"]
    await world.client.app.state.runtime.batch.run_once()
    assert (await world.job(world.finished_job))["status"] == "completed"
    paid = {
        "name": "alpha pays",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "kind": "chat",
        "requests": [{"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hi"}]}}],
    }
    answer = await call("POST", "/batch/jobs", A, json=paid)
    assert answer.status_code == 201, answer.text
    world.paid_job = answer.json()["id"]
    queued = await call(
        "POST",
        "/batch/queue",
        A,
        json={
            "job_type": "nightly",
            "provider": "local",
            "model": "sst2",
            "kind": "predict",
            "data": {"text": "alpha queued"},
        },
    )
    world.item_id = queued.json()["item_id"]
    line = {
        "custom_id": "v1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": world.model, "prompt": "alpha's file", "max_tokens": 2},
    }
    uploaded = await call(
        "POST", "/v1/files", A, data={"purpose": "batch"}, files={"file": ("alpha.jsonl", json.dumps(line).encode())}
    )
    assert uploaded.status_code == 200, uploaded.text
    world.file_id = uploaded.json()["id"]
    v1_batch = await call(
        "POST",
        "/v1/batches",
        A,
        json={"input_file_id": world.file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert v1_batch.status_code == 200, v1_batch.text
    world.v1_batch = v1_batch.json()["id"]
    assert await world.client.app.state.runtime.recorder.flush()


# Each scenario asserts what B, and an admin, get; `problems` lists what went wrong. They run in the order of
# `ROUTES`, against one world: B's own writes come last.
Scenario = Callable[[World], Awaitable[None]]


async def history_list(w: World) -> None:
    theirs = (await w.call("GET", "/history", B)).json()["items"]
    assert theirs == [], theirs
    mine = {item["id"] for item in (await w.call("GET", "/history", A)).json()["items"]}
    assert w.generation_id in mine
    admin = {item["id"] for item in (await w.call("GET", "/history", ADMIN)).json()["items"]}
    assert w.generation_id in admin
    only_beta = (await w.call("GET", "/history", ADMIN, params={"tenant": "beta"})).json()["items"]
    assert w.generation_id not in {item["id"] for item in only_beta}
    assert (await w.call("GET", "/history", B, params={"tenant": "alpha"})).status_code == 403


async def history_record(w: World) -> None:
    for record in (w.generation_id, w.prediction_id):
        assert (await w.call("GET", f"/history/{record}", B)).status_code == 404
        assert (await w.call("GET", f"/history/{record}", ADMIN)).status_code == 200


async def create_job(w: World) -> None:
    paid = {
        "name": "beta pays",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "kind": "chat",
        "requests": [{"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hi"}]}}],
    }
    refused = await w.call("POST", "/batch/jobs", B, json=paid)
    assert refused.status_code == 403 and "not granted provider 'openai'" in refused.json()["detail"]
    own = await w.call(
        "POST", "/batch/jobs", B, json={"name": "beta's", "provider": "local", "model": "gpt2", "kind": "predict"}
    )
    assert own.status_code == 201 and own.json()["tenant"] == "beta"
    w.seen["beta_job"] = own.json()["id"]
    assert own.json()["id"] not in {job["id"] for job in (await w.call("GET", "/batch/jobs", A)).json()["items"]}


async def list_jobs(w: World) -> None:
    theirs = {job["id"] for job in (await w.call("GET", "/batch/jobs", B)).json()["items"]}
    assert not theirs & {w.queued_job, w.finished_job, w.paid_job}
    admin = {job["id"] for job in (await w.call("GET", "/batch/jobs", ADMIN, params={"limit": 200})).json()["items"]}
    assert {w.queued_job, w.finished_job, w.paid_job} <= admin


async def job_by_id(w: World) -> None:
    assert (await w.call("GET", f"/batch/jobs/{w.queued_job}", B)).status_code == 404
    assert (await w.call("GET", f"/batch/jobs/{w.queued_job}", ADMIN)).json()["tenant"] == "alpha"


async def change_job(w: World) -> None:
    assert (await w.call("PATCH", f"/batch/jobs/{w.queued_job}", B, json={"name": "mine now"})).status_code == 404
    assert (await w.job(w.queued_job))["name"] == "alpha's job"


async def delete_job(w: World) -> None:
    assert (await w.call("DELETE", f"/batch/jobs/{w.finished_job}", B)).status_code == 404
    assert (await w.job(w.finished_job))["status"] == "completed"


async def add_requests(w: World) -> None:
    more = {"requests": [{"custom_id": "two", "body": {"prompt": "beta was here"}}]}
    assert (await w.call("POST", f"/batch/jobs/{w.queued_job}/requests", B, json=more)).status_code == 404
    assert (await w.job(w.queued_job))["counts"]["total"] == 1


async def list_requests(w: World) -> None:
    for tail in ("requests", "responses"):
        assert (await w.call("GET", f"/batch/jobs/{w.finished_job}/{tail}", B)).status_code == 404
        assert (await w.call("GET", f"/batch/jobs/{w.finished_job}/{tail}", ADMIN)).json()["items"]
    jsonl = await w.call("GET", f"/batch/jobs/{w.finished_job}/responses", B, params={"format": "jsonl"})
    assert jsonl.status_code == 404


async def item_by_id(w: World) -> None:
    assert (await w.call("GET", f"/batch/items/{w.item_id}", B)).status_code == 404
    assert (await w.call("GET", f"/batch/items/{w.item_id}", ADMIN)).status_code == 200


async def submit_job(w: World) -> None:
    assert (await w.call("POST", f"/batch/jobs/{w.queued_job}/submit", B)).status_code == 404
    assert (await w.job(w.queued_job))["schedule"] == "window"


async def cancel_job(w: World) -> None:
    assert (await w.call("POST", f"/batch/jobs/{w.queued_job}/cancel", B)).status_code == 404
    assert (await w.job(w.queued_job))["status"] == "queued"


async def process(w: World) -> None:
    ran = (await w.call("POST", "/batch/process", B, json={})).json()["job_ids"]
    assert not set(ran) & {w.queued_job, w.paid_job}
    assert (await w.job(w.queued_job))["schedule"] == "window"


async def process_all(w: World) -> None:
    ran = (await w.call("POST", "/batch/process/all", B)).json()["job_ids"]
    assert not set(ran) & {w.queued_job, w.paid_job}
    assert (await w.job(w.paid_job))["schedule"] == "window"


async def queue(w: World) -> None:
    item = {"job_type": "nightly", "provider": "local", "model": "sst2", "kind": "predict", "data": {"text": "b"}}
    mine = (await w.call("POST", "/batch/queue", A, json=item)).json()
    theirs = (await w.call("POST", "/batch/queue", B, json=item)).json()
    assert theirs["job_id"] != mine["job_id"], "B's item must not join A's open job"
    paid = item | {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "kind": "chat",
        "data": {"messages": [{"role": "user", "content": "hi"}]},
    }
    assert (await w.call("POST", "/batch/queue", B, json=paid)).status_code == 403


async def queue_bulk(w: World) -> None:
    item = {"job_type": "bulk", "provider": "local", "model": "sst2", "kind": "predict", "data": {"text": "b"}}
    mine = (await w.call("POST", "/batch/queue/bulk", A, json={"items": [item]})).json()
    theirs = (await w.call("POST", "/batch/queue/bulk", B, json={"items": [item]})).json()
    assert theirs[0]["job_id"] != mine[0]["job_id"]


async def queue_status(w: World) -> None:
    before = (await w.call("GET", "/batch/queue/status", B)).json()["by_job_type"]
    assert "alpha" not in str(before)
    mine = (await w.call("GET", "/batch/queue/status", A)).json()["waiting"]
    every = (await w.call("GET", "/batch/queue/status", ADMIN)).json()["waiting"]
    theirs = (await w.call("GET", "/batch/queue/status", B)).json()["waiting"]
    assert mine > 0 and every == mine + theirs


async def admin_only(w: World, method: str, path: str, **kwargs) -> None:
    assert (await w.call(method, path, B, **kwargs)).status_code == 403
    assert (await w.call(method, path, ADMIN, **kwargs)).status_code == 200


async def set_scheduler(w: World) -> None:
    await admin_only(w, "POST", "/batch/scheduler", json={"running": False})


async def stats(w: World) -> None:
    theirs = (await w.call("GET", "/batch/stats", B)).json()
    every = (await w.call("GET", "/batch/stats", ADMIN)).json()
    mine = (await w.call("GET", "/batch/stats", A)).json()
    assert theirs["jobs"]["total"] + mine["jobs"]["total"] == every["jobs"]["total"]
    assert "completed" not in theirs["jobs"]["by_status"] and mine["jobs"]["by_status"]["completed"] == 1


async def savings(w: World) -> None:
    theirs = (await w.call("GET", "/batch/savings", B)).json()
    assert theirs["total"]["jobs"] == 0 and (await w.call("GET", "/batch/savings", ADMIN)).json()["total"]["jobs"] == 1


async def alerts(w: World) -> None:
    await admin_only(w, "GET", "/batch/alerts")


async def report(w: World) -> None:
    for format in ("json", "csv"):
        theirs = await w.call("GET", "/batch/report", B, params={"format": format})
        every = await w.call("GET", "/batch/report", ADMIN, params={"format": format})
        assert "alpha" not in theirs.text and "alpha's job" in every.text


async def batch_health(w: World) -> None:
    await admin_only(w, "GET", "/batch/health")


async def count(w: World) -> None:
    assert (await w.call("GET", "/metrics/count", B)).json()["total"] == 0
    mine = (await w.call("GET", "/metrics/count", A)).json()
    assert mine["generations"] >= 2 and mine["predictions"] >= 1
    assert (await w.call("GET", "/metrics/count", ADMIN)).json()["total"] >= mine["total"]


async def aggregated(w: World) -> None:
    theirs = (await w.call("POST", "/metrics/aggregated", B, json=window())).json()
    assert theirs["total"]["requests"] == 0 and theirs["live"] is None
    every = (await w.call("POST", "/metrics/aggregated", ADMIN, json=window())).json()
    assert every["total"]["requests"] >= 3 and every["live"] is not None


async def thresholds(w: World) -> None:
    await admin_only(w, "PUT", "/metrics/thresholds", json={})


async def analyze(w: World) -> None:
    span = {key: value for key, value in window().items() if key != "bucket"}
    theirs = (await w.call("POST", "/analyze/performance", B, json=span)).json()
    mine = (await w.call("POST", "/analyze/performance", A, json=span)).json()
    assert theirs["metrics"]["requests"] == 0 and mine["metrics"]["requests"] >= 3


async def cache_stats(w: World) -> None:
    assert (await w.call("GET", "/cache", B)).json()["entries"] == 0
    assert (await w.call("GET", "/cache", A)).json()["entries"] >= 3


async def clear_cache(w: World) -> None:
    assert (await w.call("DELETE", "/cache", B)).status_code == 403
    assert (await w.call("GET", "/cache", A)).json()["entries"] >= 3
    assert (await w.call("DELETE", "/cache", ADMIN, params={"tenant": "beta"})).json()["removed"] == 0
    assert (await w.call("GET", "/cache", A)).json()["entries"] >= 3


async def generate(w: World) -> None:
    body = {"prompts": ["alpha's secret prompt"], "max_new_tokens": 2}
    assert (await w.call("POST", "/generate", A, json=body)).headers["x-cache"] == "HIT"
    theirs = await w.call("POST", "/generate", B, json=body)
    assert theirs.headers["x-cache"] == "MISS", "B's identical prompt must be computed, not served A's answer"
    assert (await w.call("GET", f"/history/{theirs.json()[0]['id']}", A)).status_code == 404


async def predict(w: World) -> None:
    assert (await w.call("POST", "/predict", B, json={"text": "alpha's secret text"})).headers["x-cache"] == "MISS"


async def completions(w: World) -> None:
    body = {"model": w.model, "prompt": "alpha completes", "max_tokens": 2, "temperature": 0}
    assert (await w.call("POST", "/v1/completions", B, json=body)).headers["x-cache"] == "MISS"


async def chat_completions(w: World) -> None:
    body = {"model": w.model, "messages": [{"role": "user", "content": "hi"}]}
    assert (await w.call("POST", "/v1/chat/completions", {}, json=body)).status_code == 401
    assert (await w.call("POST", "/v1/chat/completions", B, json=body)).status_code == 400  # no chat template


async def upload_file(w: World) -> None:
    own = await w.call("POST", "/v1/files", B, data={"purpose": "batch"}, files={"file": ("beta.jsonl", b"{}")})
    assert own.status_code == 200
    assert own.json()["id"] not in {f["id"] for f in (await w.call("GET", "/v1/files", A)).json()["data"]}


async def list_files(w: World) -> None:
    assert w.file_id not in {f["id"] for f in (await w.call("GET", "/v1/files", B)).json()["data"]}
    assert w.file_id in {f["id"] for f in (await w.call("GET", "/v1/files", A)).json()["data"]}


async def file_by_id(w: World) -> None:
    for method, path in (
        ("GET", f"/v1/files/{w.file_id}"),
        ("GET", f"/v1/files/{w.file_id}/content"),
        ("DELETE", f"/v1/files/{w.file_id}"),
    ):
        assert (await w.call(method, path, B)).status_code == 404, path
    assert (await w.call("GET", f"/v1/files/{w.file_id}/content", A)).status_code == 200


async def create_v1_batch(w: World) -> None:
    body = {"input_file_id": w.file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    assert (await w.call("POST", "/v1/batches", B, json=body)).status_code == 404, "B may not run A's file"


async def list_v1_batches(w: World) -> None:
    assert w.v1_batch not in {b["id"] for b in (await w.call("GET", "/v1/batches", B)).json()["data"]}
    assert w.v1_batch in {b["id"] for b in (await w.call("GET", "/v1/batches", A)).json()["data"]}


async def v1_batch_by_id(w: World) -> None:
    for method, path in (("GET", f"/v1/batches/{w.v1_batch}"), ("POST", f"/v1/batches/{w.v1_batch}/cancel")):
        assert (await w.call(method, path, B)).status_code == 404, path
    assert (await w.call("GET", f"/v1/batches/{w.v1_batch}", A)).json()["status"] != "cancelling"


NO_TENANT_DATA = "holds no tenant data"
ROUTES: dict[tuple[str, str], Scenario | str] = {
    ("GET", "/"): f"{NO_TENANT_DATA}: the server's name, version and models",
    ("GET", "/health"): f"{NO_TENANT_DATA}: the state of the server's dependencies",
    ("GET", "/health/live"): f"{NO_TENANT_DATA}: whether the process's loops run",
    ("GET", "/metrics"): f"{NO_TENANT_DATA}: Prometheus counters of the process, labelled by route and model",
    ("GET", "/v1/models"): f"{NO_TENANT_DATA}: the served model",
    ("GET", "/batch/scheduler"): f"{NO_TENANT_DATA}: whether this process runs the worker, and the window",
    ("GET", "/metrics/thresholds"): f"{NO_TENANT_DATA}: the server's alert thresholds (changing them: admin only)",
    ("GET", "/history"): history_list,
    ("GET", "/history/{record_id}"): history_record,
    ("POST", "/batch/jobs"): create_job,
    ("GET", "/batch/jobs"): list_jobs,
    ("GET", "/batch/jobs/{job_id}"): job_by_id,
    ("PATCH", "/batch/jobs/{job_id}"): change_job,
    ("DELETE", "/batch/jobs/{job_id}"): delete_job,
    ("POST", "/batch/jobs/{job_id}/requests"): add_requests,
    ("GET", "/batch/jobs/{job_id}/requests"): list_requests,
    ("GET", "/batch/jobs/{job_id}/responses"): list_requests,
    ("GET", "/batch/items/{item_id}"): item_by_id,
    ("POST", "/batch/jobs/{job_id}/submit"): submit_job,
    ("POST", "/batch/jobs/{job_id}/cancel"): cancel_job,
    ("POST", "/batch/process"): process,
    ("POST", "/batch/process/all"): process_all,
    ("POST", "/batch/queue"): queue,
    ("POST", "/batch/queue/bulk"): queue_bulk,
    ("GET", "/batch/queue/status"): queue_status,
    ("POST", "/batch/scheduler"): set_scheduler,
    ("GET", "/batch/stats"): stats,
    ("GET", "/batch/savings"): savings,
    ("GET", "/batch/alerts"): alerts,
    ("GET", "/batch/report"): report,
    ("GET", "/batch/health"): batch_health,
    ("GET", "/metrics/count"): count,
    ("POST", "/metrics/aggregated"): aggregated,
    ("PUT", "/metrics/thresholds"): thresholds,
    ("POST", "/analyze/performance"): analyze,
    ("GET", "/cache"): cache_stats,
    ("DELETE", "/cache"): clear_cache,
    ("GET", "/v1/files"): list_files,
    ("GET", "/v1/files/{file_id}"): file_by_id,
    ("GET", "/v1/files/{file_id}/content"): file_by_id,
    ("DELETE", "/v1/files/{file_id}"): file_by_id,
    ("POST", "/v1/batches"): create_v1_batch,
    ("GET", "/v1/batches"): list_v1_batches,
    ("GET", "/v1/batches/{batch_id}"): v1_batch_by_id,
    ("POST", "/v1/batches/{batch_id}/cancel"): v1_batch_by_id,
    # Last: B's own requests, which the reads above must not have counted yet.
    ("POST", "/generate"): generate,
    ("POST", "/predict"): predict,
    ("POST", "/v1/completions"): completions,
    ("POST", "/v1/chat/completions"): chat_completions,
    ("POST", "/v1/files"): upload_file,
}


@pytest.fixture
async def world(settings: Settings, tmp_path: Path):
    async with serving(tenant_settings(settings, tmp_path)) as client:
        world = World(client)
        await seed(world)
        yield world


async def test_every_route_keeps_each_tenant_to_its_own_data(world):
    spec = (await world.client.get("/openapi.json")).json()
    routes = {(method.upper(), path) for path, operations in spec["paths"].items() for method in operations}
    assert routes - ROUTES.keys() == set(), "classify each new route in ROUTES: a scenario, or why it holds no data"
    assert ROUTES.keys() - routes == set(), "ROUTES names routes the server no longer has"
    problems = []
    for route, scenario in ROUTES.items():
        if isinstance(scenario, str):
            continue
        try:
            await scenario(world)
        except AssertionError as exc:
            problems.append(f"{route}: {exc}")
    assert problems == [], "\n".join(problems)


async def test_the_cache_is_shared_across_tenants_only_when_the_scope_is_global(settings, tmp_path):
    body = {"prompts": ["shared or not"], "max_new_tokens": 2}
    async with serving(tenant_settings(settings, tmp_path, cache_scope="global")) as client:
        assert (await client.post("/generate", headers=A, json=body)).headers["x-cache"] == "MISS"
        assert (await client.post("/generate", headers=B, json=body)).headers["x-cache"] == "HIT"
        assert (await client.get("/cache", headers=B)).json()["entries"] == 1


async def test_a_request_joining_the_same_computation_stays_within_its_tenant(settings, tmp_path):
    async with serving(tenant_settings(settings, tmp_path)) as client:
        generation = client.app.state.runtime.generation
        options_a = generation.plan(
            ["same prompt"], GenerationOptions(max_new_tokens=2), generation.cache.scope("alpha")
        )
        options_b = generation.plan(
            ["same prompt"], GenerationOptions(max_new_tokens=2), generation.cache.scope("beta")
        )
        assert options_a != options_b, "equal jobs of two tenants must not merge in the batcher"
        assert generation.key(options_a[0]) != generation.key(options_b[0])


async def test_every_integer_query_parameter_is_bounded(world):
    """Out of range on either side is a 422 (400 in OpenAI's shape on /v1), never a 500 (e.g. a cursor past the
    database's integer)."""
    spec = (await world.client.get("/openapi.json")).json()
    checked = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                schema = parameter["schema"]
                options = schema.get("anyOf", [schema])
                integer = next((option for option in options if option.get("type") == "integer"), None)
                if integer is None or parameter["in"] != "query":
                    continue
                assert "maximum" in integer and "minimum" in integer, f"{method} {path} ?{parameter['name']}"
                url = path.replace("{job_id}", world.queued_job).replace("{record_id}", world.generation_id)
                for value in (integer["maximum"] + 1, integer["minimum"] - 1, 10**20):
                    answer = await world.call(method.upper(), url, ADMIN, params={parameter["name"]: value})
                    expected = 400 if path.startswith("/v1/") else 422
                    assert answer.status_code == expected, (method, path, parameter["name"], value, answer.text)
                    checked += 1
    assert checked >= 3 * 5


async def test_csv_cells_that_a_spreadsheet_would_evaluate_are_escaped(world):
    for name in ('=HYPERLINK("http://evil")', "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        body = {"name": name, "provider": "local", "model": "gpt2", "kind": "generate"}
        assert (await world.call("POST", "/batch/jobs", B, json=body)).status_code == 201
    text = (await world.call("GET", "/batch/report", B, params={"format": "csv"})).text
    names = [row["name"] for row in csv.DictReader(io.StringIO(text, newline=""))]
    assert len(names) == 6 and all(name.startswith("'") for name in names), names


async def test_a_user_key_cannot_do_admin_operations_and_an_open_server_is_one_admin_tenant(settings):
    async with serving(settings) as client:
        assert (await client.put("/metrics/thresholds", json={})).status_code == 200
        generated = (await client.post("/generate", json={"prompts": ["open"], "max_new_tokens": 1})).json()
        assert await client.app.state.runtime.recorder.flush()
        assert (await client.get(f"/history/{generated[0]['id']}")).status_code == 200
        job = {"name": "open", "provider": "openai", "model": "m", "kind": "chat"}
        assert (await client.post("/batch/jobs", json=job)).status_code == 422, "unconfigured, not forbidden"

"""POST /generate with "stream": true: server-sent events as tokens are decoded."""

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from server.db.analytics_models import RequestRecord
from tests.support.metrics import metric


def parse(body: str) -> list[tuple[str, dict | str]]:
    """(event type, payload) per server-sent event; `[DONE]` stays a string."""
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = fields["data"]
        events.append((fields.get("event", "message"), data if data == "[DONE]" else json.loads(data)))
    return events


async def stream(client: httpx.AsyncClient, prompts: list[str], **params) -> list[tuple[str, dict | str]]:
    response = await client.post("/generate", json={"prompts": prompts, "stream": True, **params})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse(response.text)


@pytest.fixture(params=["continuous", "static"])
def settings(request, settings):
    return settings.model_copy(update={"generator_scheduler": request.param})


async def test_chunks_add_up_to_the_answer_and_each_prompt_ends_with_its_usage(app_client):
    prompts = ["Once upon a time", "The weather today"]
    events = await stream(app_client, prompts, max_new_tokens=12)
    plain = (await app_client.post("/generate", json={"prompts": prompts, "max_new_tokens": 12})).json()
    assert events[-1] == ("message", "[DONE]")
    chunks = [e for kind, e in events[:-1] if "text" in e]
    finals = {e["index"]: e for kind, e in events[:-1] if "finish_reason" in e}
    continuous = app_client.app.state.runtime.settings.generator_scheduler == "continuous"
    for index, answer in enumerate(plain):
        mine = [c for c in chunks if c["index"] == index]
        assert "".join(c["text"] for c in mine) == answer["completion"]
        assert sum(len(c["token_ids"]) for c in mine) == answer["usage"]["completion_tokens"]
        assert finals[index]["usage"] == answer["usage"] and finals[index]["finish_reason"] == "length"
        assert len(mine) > 1 if continuous else len(mine) == 1
        last_chunk = max(i for i, (_, e) in enumerate(events) if e in mine)
        assert last_chunk < events.index(("message", finals[index]))


async def test_the_final_event_carries_the_id_of_the_recorded_generation(app_client):
    events = await stream(app_client, ["Remember this one"], max_new_tokens=4)
    [final] = [e for _, e in events if isinstance(e, dict) and "finish_reason" in e]
    await app_client.app.state.runtime.recorder.flush()
    recorded = await app_client.get(f"/history/{final['id']}")
    assert recorded.status_code == 200 and recorded.json()["prompt"] == "Remember this one"


async def test_a_cached_prompt_streams_its_whole_text_at_once(app_client):
    first = await stream(app_client, ["Cache me"], max_new_tokens=8)
    again = await stream(app_client, ["Cache me"], max_new_tokens=8)
    [chunk] = [e for _, e in again if isinstance(e, dict) and "text" in e]
    assert chunk["text"] == "".join(e["text"] for _, e in first if isinstance(e, dict) and "text" in e)
    assert [e["cached"] for _, e in again if isinstance(e, dict) and "finish_reason" in e] == [True]


async def test_errors_before_the_stream_starts_are_plain_http_errors(app_client):
    response = await app_client.post("/generate", json={"prompts": ["x" * 5000], "stream": True})
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    gate = app_client.app.state.runtime.generation.batcher.gate
    gate.reserved = gate.limit  # every place taken by requests being admitted
    full = await app_client.post("/generate", json={"prompts": ["queue is full"], "stream": True})
    assert full.status_code == 503 and "retry-after" in full.headers


async def test_a_failure_after_the_stream_started_is_an_error_event(app_client):
    runtime = app_client.app.state.runtime
    step = runtime.generator.decoder.step
    static_compute = getattr(runtime.generation.batcher, "compute", None)

    def explode(*args):
        raise RuntimeError("the model broke mid-stream")

    runtime.generator.decoder.step = explode
    if static_compute is not None:
        runtime.generation.batcher.compute = explode
    try:
        events = await stream(app_client, ["This will break"], max_new_tokens=8)
    finally:
        runtime.generator.decoder.step = step
    kind, error = events[-2]
    assert kind == "error" and error["status"] == 500 and "failed on this input" in error["detail"]
    assert events[-1] == ("message", "[DONE]")


async def test_a_client_that_disconnects_stops_its_rows_and_the_request_is_recorded(live_app):
    base_url, app = live_app
    runtime = app.state.runtime
    continuous = runtime.settings.generator_scheduler == "continuous"
    gone = metric("scheduler_aborted_items_total", model="generator", reason="cancelled")
    async with httpx.AsyncClient(base_url=base_url) as client:
        body = {"prompts": ["A very long story"], "max_new_tokens": 256, "stream": True}
        async with client.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            if continuous:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break
    for _ in range(200):
        if metric("scheduler_aborted_items_total", model="generator", reason="cancelled") > gone:
            break
        await asyncio.sleep(0.05)
    assert metric("scheduler_aborted_items_total", model="generator", reason="cancelled") - gone == 1
    await runtime.recorder.flush()
    now = datetime.now(UTC)
    window = {
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(minutes=2)).isoformat(),
        "bucket": "day",
        "endpoint": "generate",
    }
    async with httpx.AsyncClient(base_url=base_url) as client:
        total = (await client.post("/metrics/aggregated", json=window)).json()["total"]
    # A client that leaves is recorded (499), and it is the client's doing, not a server error.
    assert (total["requests"], total["errors"]) == (1, 0)
    async with runtime.sessions() as session:
        assert (await session.scalars(select(RequestRecord.status))).all() == [499]

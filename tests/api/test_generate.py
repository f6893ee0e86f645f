import asyncio

import httpx
import pytest

from server.ml.generator import GenerationParams
from tests.api.gates import Gate, until_queued
from tests.support.metrics import metric


async def generate(client: httpx.AsyncClient, prompts: list[str], **params) -> httpx.Response:
    return await client.post("/generate", json={"prompts": prompts, **params})


async def test_returns_one_object_per_prompt_with_the_contract_fields(app_client):
    response = await generate(app_client, ["Once upon a time", "The weather today"], max_new_tokens=6)
    assert response.status_code == 200
    items = response.json()
    assert [item["prompt"] for item in items] == ["Once upon a time", "The weather today"]
    for item in items:
        assert set(item) == {
            "id",
            "prompt",
            "generated_text",
            "completion",
            "model_name",
            "created_at",
            "finish_reason",
            "usage",
            "cached",
        }
        assert item["generated_text"] == item["prompt"] + item["completion"]
        assert item["model_name"].startswith("offline-stand-in:")
        assert item["usage"]["completion_tokens"] == 6 and item["finish_reason"] == "length"
        assert item["usage"]["prompt_tokens"] > 0


async def test_max_length_counts_the_prompt(app_client):
    runtime = app_client.app.state.runtime
    prompt_tokens = len(runtime.generator.encode("Once upon a time"))
    [item] = (await generate(app_client, ["Once upon a time"], max_length=prompt_tokens + 3)).json()
    assert item["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 3}


async def test_greedy_output_matches_the_model_called_directly(app_client):
    runtime = app_client.app.state.runtime
    [item] = (await generate(app_client, ["The cat sat"], max_new_tokens=8)).json()
    direct = runtime.generator.generate([runtime.generator.encode("The cat sat")], GenerationParams(8))[0]
    assert item["completion"] == direct.text


@pytest.mark.parametrize(
    "body, where",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["x"] * 33}, "prompts"),
        ({"prompts": [""]}, "prompts"),
        ({"prompts": "just a string"}, "prompts"),
        ({"prompts": [42]}, "prompts"),
        ({"prompts": ["x"], "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": ["x"], "max_new_tokens": 257}, "max_new_tokens"),
        ({"prompts": ["x"], "max_new_tokens": "many"}, "max_new_tokens"),
        ({"prompts": ["x"], "temperature": -1}, "temperature"),
        ({"prompts": ["x"], "top_p": 0}, "top_p"),
        ({"prompts": ["x"], "max_new_tokens": 5, "max_length": 9}, "body"),
        ({"prompts": ["x"], "unknown": 1}, "unknown"),
    ],
)
async def test_bad_input_is_a_422_naming_the_field(app_client, body, where):
    response = await app_client.post("/generate", json=body)
    assert response.status_code == 422
    assert any(where in map(str, error["loc"]) for error in response.json()["detail"])


async def test_non_json_body_is_a_422(app_client):
    response = await app_client.post("/generate", content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


async def test_prompt_limits_from_settings_and_model_context_are_422(app_client):
    settings = app_client.app.state.runtime.settings
    too_long = await generate(app_client, ["ok", "y" * (settings.max_prompt_chars + 1)])
    assert too_long.status_code == 422
    assert too_long.json()["detail"][0]["loc"] == ["body", "prompts", 1]
    assert "MAX_PROMPT_CHARS" in too_long.json()["detail"][0]["msg"]
    context = app_client.app.state.runtime.generator.context_size
    beyond = await generate(app_client, ["word " * 790], max_new_tokens=256)
    assert beyond.status_code == 422 and f"context of {context}" in beyond.json()["detail"][0]["msg"]
    no_room = await generate(app_client, ["Once upon a time"], max_length=2)
    assert no_room.status_code == 422 and "max_length" in no_room.json()["detail"][0]["msg"]


async def test_seeded_sampling_is_reproducible_and_unseeded_is_not(app_client):
    body = {"max_new_tokens": 12, "temperature": 3.0}
    seeded = [(await generate(app_client, ["The cat"], seed=5, **body)).json()[0]["completion"] for _ in range(2)]
    assert seeded[0] == seeded[1]
    fresh = {(await generate(app_client, ["The cat"], **body)).json()[0]["completion"] for _ in range(4)}
    assert len(fresh) > 1


async def test_generations_are_recorded_in_batches_behind_the_response(app_client):
    runtime = app_client.app.state.runtime
    written = metric("records_written_total", table="generations")
    await asyncio.gather(*(generate(app_client, [f"record {i}", f"and {i}"], max_new_tokens=2) for i in range(5)))
    await runtime.recorder.flush()
    assert metric("records_written_total", table="generations") - written == 10
    page = (await app_client.get("/history", params={"limit": 10})).json()
    expected = {f"record {i}" for i in range(5)} | {f"and {i}" for i in range(5)}
    assert {item["prompt"] for item in page["items"]} == expected


class TestStaticBatcher:
    """GENERATOR_SCHEDULER=static: the micro-batcher's guarantees, seen through its model calls (a `Gate`).
    tests/services/scheduling/test_continuous.py checks the same guarantees for the continuous scheduler."""

    @pytest.fixture
    def settings(self, settings):
        return settings.model_copy(update={"generator_scheduler": "static"})

    async def test_concurrent_requests_with_three_parameter_sets_are_batched_but_never_mixed(self, app_client):
        runtime = app_client.app.state.runtime
        param_sets = [
            {"max_new_tokens": 6},
            {"max_new_tokens": 9},
            {"max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95, "seed": 11},
        ]
        prompts = [f"Request number {i} says" for i in range(100)]
        batches_before = metric("model_batches_total", model="generator", param_sets="1")
        items_before = metric("model_batch_size_sum", model="generator")
        gate = Gate(runtime.generation.batcher)
        first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
        await gate.wait_entered()
        requests = [asyncio.create_task(generate(app_client, [p], **param_sets[i % 3])) for i, p in enumerate(prompts)]
        await until_queued(runtime.generation.batcher, 100)
        gate.open.set()
        responses = await asyncio.gather(*requests)
        await first
        assert all(r.status_code == 200 for r in responses)
        for i, response in enumerate(responses):
            options = param_sets[i % 3]
            params = GenerationParams(
                options["max_new_tokens"], options.get("temperature", 0.0), options.get("top_p", 1.0)
            )
            prompt = runtime.generator.encode(prompts[i])
            expected = runtime.generator.generate([prompt], params, [options.get("seed")])[0]
            assert response.json()[0]["completion"] == expected.text, f"request {i} got another parameter set's output"
        batches = metric("model_batches_total", model="generator", param_sets="1") - batches_before
        computed = metric("model_batch_size_sum", model="generator") - items_before
        assert computed == 101 and batches < 101 / 2
        assert all(len({(job.params, job.seed) for job in batch}) == 1 for batch in gate.batches)
        text = (await app_client.get("/metrics")).text
        mixed = [
            line
            for line in text.splitlines()
            if line.startswith("model_batches_total") and 'param_sets="1"' not in line
        ]
        assert mixed == []

    async def test_identical_prompts_in_a_batch_are_computed_once(self, app_client):
        runtime = app_client.app.state.runtime
        gate = Gate(runtime.generation.batcher)
        first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
        await gate.wait_entered()
        same = [asyncio.create_task(generate(app_client, ["Same prompt"], max_new_tokens=4)) for _ in range(5)]
        sampled = [
            asyncio.create_task(generate(app_client, ["Same prompt"], max_new_tokens=4, temperature=1.0))
            for _ in range(2)
        ]
        await until_queued(runtime.generation.batcher, 3)
        gate.open.set()
        bodies = [(await t).json()[0] for t in same]
        await asyncio.gather(first, *sampled)
        assert len({b["completion"] for b in bodies}) == 1
        assert sorted(len(batch) for batch in gate.batches) == [1, 1, 2]

    async def test_a_multi_prompt_request_fills_one_batch_with_other_requests(self, app_client):
        runtime = app_client.app.state.runtime
        gate = Gate(runtime.generation.batcher)
        first = asyncio.create_task(generate(app_client, ["warm up"], max_new_tokens=2))
        await gate.wait_entered()
        many = asyncio.create_task(generate(app_client, ["a b", "c d", "e f"], max_new_tokens=2))
        one = asyncio.create_task(generate(app_client, ["g h"], max_new_tokens=2))
        await until_queued(runtime.generation.batcher, 4)
        gate.open.set()
        await asyncio.gather(first, many, one)
        assert [len(batch) for batch in gate.batches] == [1, 4]

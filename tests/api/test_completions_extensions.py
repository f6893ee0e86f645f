"""/v1/completions as the field's standard clients call it: `vllm bench serve`'s streamed request, lm-evaluation-
harness's `local-completions` loglikelihood request (echo + logprobs), and the vLLM/TGI/llama.cpp extensions."""

import asyncio
import json

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from server.ml.decoding import GenerationParams, Sequence
from tests.support.app import serving

CONTEXT, CONTINUATION = "The stock market rose sharply on Tuesday", " after the bank held rates"


def events(body: str) -> list[dict | str]:
    payloads = [
        dict(line.split(": ", 1) for line in block.splitlines())["data"] for block in body.strip().split("\n\n")
    ]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


async def complete(client: httpx.AsyncClient, **body) -> httpx.Response:
    model = client.app.state.runtime.generator.name
    return await client.post("/v1/completions", json={"model": model, **body})


async def test_vllm_bench_serve_request_is_answered_and_streamed(app_client):
    # vllm/benchmarks/lib/endpoint_request_func.py, async_request_openai_completions, as `vllm bench serve` sends it.
    payload = {
        "prompt": "Benchmarks send this",
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 16,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    response = await complete(app_client, **payload)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 16
    texts = [c["choices"][0] for c in chunks[:-2]]
    assert len(texts) > 2 and all(choice["logprobs"] is None for choice in texts)
    plain = (await complete(app_client, prompt="Benchmarks send this", temperature=0, max_tokens=16)).json()
    assert "".join(choice["text"] for choice in texts) == plain["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(standins) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(standins[0]).eval()


def expected_logprobs(reference: AutoModelForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
@pytest.mark.parametrize("max_tokens", [0, 1])
async def test_lm_eval_loglikelihood_request_gets_the_models_own_logprobs(settings, reference, scheduler, max_tokens):
    async with serving(settings.model_copy(update={"generator_scheduler": scheduler})) as client:
        # lm_eval/models/openai_completions.py, LocalCompletionsAPI._create_payload(generate=False).
        response = await complete(
            client,
            prompt=CONTEXT + CONTINUATION,
            temperature=0,
            max_tokens=max_tokens,
            logprobs=1,
            seed=1234,
            echo=True,
        )
        generator = client.app.state.runtime.generator
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    logprobs, ids = choice["logprobs"], generator.encode(CONTEXT + CONTINUATION)
    assert len(logprobs["tokens"]) == len(ids) + max_tokens and "".join(logprobs["tokens"]) == choice["text"]
    assert choice["text"].startswith(CONTEXT + CONTINUATION)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(ids) + max_tokens)]
    expected = expected_logprobs(reference, ids)
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(
        [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4
    )
    for position in range(1, len(ids) + max_tokens):
        top, token = logprobs["top_logprobs"][position], logprobs["tokens"][position]
        best = float(expected[position - 1].max())
        assert token in top and max(top.values()) == pytest.approx(best, abs=1e-4)
    if max_tokens:
        # Greedy: the generated token is the most likely one.
        assert logprobs["token_logprobs"][-1] == pytest.approx(float(expected[-1].max()), abs=1e-4)
    # How lm-eval reads it (LocalCompletionsAPI.parse_logprobs): the continuation's sum and whether it is greedy.
    context_length = len(generator.encode(CONTEXT))
    end = len(ids)
    continuation = sum(logprobs["token_logprobs"][context_length:end])
    assert continuation == pytest.approx(
        sum(float(expected[i - 1, ids[i]]) for i in range(context_length, end)), abs=1e-3
    )


async def test_token_id_prompts_as_lm_eval_sends_them_by_default(app_client):
    # tokenized_requests=True (local-completions' default): a list of token-id prompts.
    generator = app_client.app.state.runtime.generator
    ids = generator.encode(CONTEXT + CONTINUATION)
    body = {"temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    by_ids = await complete(app_client, prompt=[ids, ids[:4]], **body)
    by_text = await complete(app_client, prompt=CONTEXT + CONTINUATION, **body)
    assert by_ids.status_code == 200, by_ids.text
    first, second = by_ids.json()["choices"]
    assert (
        first["logprobs"] == by_text.json()["choices"][0]["logprobs"]
        and first["text"] == by_text.json()["choices"][0]["text"]
    )
    assert len(second["logprobs"]["tokens"]) == 5 and by_ids.json()["usage"]["prompt_tokens"] == len(ids) + 4
    single = await complete(app_client, prompt=ids[:4], **body)
    assert single.json()["choices"][0]["logprobs"] == second["logprobs"]
    outside = await complete(app_client, prompt=[generator.vocab_size], max_tokens=1)
    assert outside.status_code == 400 and "vocabulary" in outside.json()["error"]["message"]


async def test_streamed_logprobs_add_up_to_the_plain_answers(app_client):
    body = {"prompt": "Streaming scores", "temperature": 0, "max_tokens": 10, "logprobs": 2}
    plain = (await complete(app_client, **body)).json()["choices"][0]["logprobs"]
    streamed = events((await complete(app_client, stream=True, **body)).text)
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in streamed[:-1]:
        if (choice := chunk["choices"][0])["logprobs"] is not None:
            for name, values in choice["logprobs"].items():
                joined[name] += values
    assert joined == plain and len(plain["tokens"]) == 10
    # Two alternatives plus the chosen token, fewer where their texts coincide (parts of one character).
    assert all(
        token in top and len(top) <= 3 for token, top in zip(plain["tokens"], plain["top_logprobs"], strict=True)
    )


async def test_cached_answers_with_and_without_logprobs_are_kept_apart(app_client):
    plain = await complete(app_client, prompt="Cache me", temperature=0, max_tokens=5)
    scored = await complete(app_client, prompt="Cache me", temperature=0, max_tokens=5, logprobs=1)
    again = await complete(app_client, prompt="Cache me", temperature=0, max_tokens=5, logprobs=1)
    echoed = await complete(app_client, prompt="Cache me", temperature=0, max_tokens=5, logprobs=1, echo=True)
    assert [r.headers["X-Cache"] for r in (plain, scored, again, echoed)] == ["MISS", "MISS", "HIT", "MISS"]
    assert plain.json()["choices"][0]["logprobs"] is None
    assert again.json()["choices"] == scored.json()["choices"]
    assert len(scored.json()["choices"][0]["logprobs"]["tokens"]) == 5
    assert echoed.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None


async def test_extensions_reach_the_decoder_per_row(app_client):
    generator = app_client.app.state.runtime.generator
    greedy = (await complete(app_client, prompt="Once upon a time", temperature=0, max_tokens=10)).json()
    top_one = (
        await complete(app_client, prompt="Once upon a time", temperature=1.0, top_k=1, seed=5, max_tokens=10)
    ).json()
    assert top_one["choices"][0]["text"] == greedy["choices"][0]["text"]

    penalized = (
        await complete(app_client, prompt="Once upon a time", temperature=0, max_tokens=10, repetition_penalty=2.0)
    ).json()["choices"][0]["text"]
    expected = Sequence(tuple(generator.encode("Once upon a time")), GenerationParams(10, repetition_penalty=2.0))
    with torch.inference_mode():
        generator.decoder.complete([expected])
    assert penalized == generator.result(expected).text != greedy["choices"][0]["text"]

    bounded = await complete(
        app_client, prompt="Once upon a time", temperature=0, max_tokens=6, min_tokens=6, ignore_eos=True
    )
    assert bounded.status_code == 200 and bounded.json()["usage"]["completion_tokens"] == 6
    await app_client.app.state.runtime.recorder.flush()
    [record] = [
        item
        for item in (await app_client.get("/history", params={"limit": 10})).json()["items"]
        if item["params"].get("min_tokens")
    ]
    assert record["params"] == {
        "max_new_tokens": 6,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "min_tokens": 6,
        "ignore_eos": True,
    }


async def test_a_plain_row_decoded_beside_extended_rows_keeps_its_tokens(app_client):
    generator = app_client.app.state.runtime.generator
    prompt = "Neighbours in one batch"
    plain, *_ = await asyncio.gather(
        complete(app_client, prompt=prompt, temperature=0, max_tokens=12),
        complete(app_client, prompt=prompt + " too", temperature=1.0, top_k=3, seed=1, max_tokens=12),
        complete(app_client, prompt="Another one", temperature=0, repetition_penalty=1.5, min_tokens=4, max_tokens=12),
        complete(app_client, prompt="Scored", temperature=0, max_tokens=12, logprobs=5, echo=True),
    )
    alone = Sequence(tuple(generator.encode(prompt)), GenerationParams(12))
    with torch.inference_mode():
        generator.decoder.complete([alone])
    assert plain.json()["choices"][0]["text"] == generator.result(alone).text


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 4, "min_tokens": 5},
        {"stream": True, "echo": True, "logprobs": 1},
        {"logprobs": 21},
        {"top_k": -2},
        {"repetition_penalty": 0},
        {"best_of": 2},
        {"prompt": [1, "x"]},
        {"prompt": [-1]},
    ],
)
async def test_what_cannot_be_honoured_is_refused(app_client, body):
    response = await complete(app_client, **{"prompt": "x", **body})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


async def test_the_openai_sdk_reads_logprobs(live_app):
    base_url, app = live_app
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as sdk:
        model = app.state.runtime.generator.name
        completion = await sdk.completions.create(
            model=model, prompt="Read by the SDK", max_tokens=4, temperature=0, logprobs=2, echo=True
        )
        chunks = [
            chunk
            async for chunk in await sdk.completions.create(
                model=model, prompt="Read by the SDK", max_tokens=4, temperature=0, logprobs=2, stream=True
            )
        ]
    logprobs = completion.choices[0].logprobs
    prompt_tokens = completion.usage.prompt_tokens
    assert len(logprobs.tokens) == prompt_tokens + 4 and logprobs.token_logprobs[0] is None
    streamed = [
        value
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for value in chunk.choices[0].logprobs.token_logprobs
    ]
    assert streamed == logprobs.token_logprobs[prompt_tokens:]

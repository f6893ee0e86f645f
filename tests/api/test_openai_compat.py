"""The official `openai` client against the server over real HTTP: /v1/models, /v1/completions (plain and
streamed), /v1/chat/completions, and errors in OpenAI's shape (the SDK raises its own exception types)."""

import httpx
import openai
import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"api_keys": "sk-test", "ingress_rate_limit_generate": "30/minute"})


@pytest.fixture
async def sdk(live_app):
    base_url, app = live_app
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0) as client:
        client.app, client.server_url = app, base_url
        yield client


async def model_id(sdk: openai.AsyncOpenAI) -> str:
    [model] = (await sdk.models.list()).data
    return model.id


async def reference(sdk: openai.AsyncOpenAI, prompt: str, new_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=sdk.server_url, headers={"Authorization": "Bearer sk-test"}) as client:
        answer = await client.post("/generate", json={"prompts": [prompt], "max_new_tokens": new_tokens})
    return answer.json()[0]


async def test_models_lists_the_served_generator(sdk):
    assert await model_id(sdk) == sdk.app.state.runtime.generator.name


async def test_completions_answer_in_openai_shape_like_generate(sdk):
    model = await model_id(sdk)
    completion = await sdk.completions.create(
        model=model, prompt=["Once upon a time", "The weather"], max_tokens=7, temperature=0
    )
    assert completion.object == "text_completion" and completion.model == model
    for index, prompt in enumerate(["Once upon a time", "The weather"]):
        expected = await reference(sdk, prompt, 7)
        choice = completion.choices[index]
        assert (choice.index, choice.text, choice.finish_reason) == (index, expected["completion"], "length")
    assert completion.usage.completion_tokens == 14
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 14


async def test_streamed_completions_add_up_and_end_with_usage(sdk):
    model = await model_id(sdk)
    stream = await sdk.completions.create(
        model=model,
        prompt="Streaming with the SDK",
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert "".join(texts) == (await reference(sdk, "Streaming with the SDK", 9))["completion"]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1]) and len(texts) > 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


async def test_stop_and_echo(sdk):
    model = await model_id(sdk)
    full = (await reference(sdk, "Echo this", 12))["completion"]
    stop = full[len(full) // 2 :][:2]
    completion = await sdk.completions.create(
        model=model, prompt="Echo this", max_tokens=12, temperature=0, stop=[stop], echo=True
    )
    [choice] = completion.choices
    assert choice.finish_reason == "stop" and choice.text == "Echo this" + full[: full.find(stop)]


async def test_errors_come_in_openai_shape(sdk):
    model = await model_id(sdk)
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.completions.create(model="gpt-4", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as many:
        await sdk.completions.create(model=model, prompt="x", n=2)
    assert many.value.status_code == 400 and many.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        await sdk.completions.create(model=model, prompt="x", suffix="y")
    async with openai.AsyncOpenAI(base_url=str(sdk.base_url), api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as denied:
            await stranger.completions.create(model=model, prompt="x")
    assert denied.value.code == "invalid_api_key"


async def test_rate_limits_apply_as_to_generate(sdk):
    model = await model_id(sdk)
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(40):
            await sdk.completions.create(model=model, prompt="again", max_tokens=1, temperature=0)
    assert limited.value.code == "rate_limit_exceeded"


async def test_chat_needs_a_chat_template(sdk):
    model = await model_id(sdk)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in refused.value.message
    sdk.app.state.runtime.generator.tokenizer.chat_template = CHAT_TEMPLATE
    chat = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    expected = await reference(sdk, "user: hi\nassistant:", 5)
    assert chat.choices[0].message.content == expected["completion"] and chat.usage.completion_tokens == 5
    stream = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True
    )
    deltas = [chunk.choices[0].delta async for chunk in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == expected["completion"]


async def test_the_configured_model_id_is_an_alias_of_the_served_name(sdk):
    settings = sdk.app.state.runtime.settings
    completion = await sdk.completions.create(model=settings.generator_model, prompt="x", max_tokens=2, temperature=0)
    assert completion.model == await model_id(sdk) != settings.generator_model

"""`/v1/batches` routed to a paid provider by the lines' model (BATCH_MODEL_ROUTES): the fake OpenAI and Anthropic
servers run the batch through the batch offload's worker, and the output file holds their answers, through the
official `openai` SDK."""

import io
import json

import httpx
import openai
import pytest

from server.main import create_app
from tests.fakes import FakeAnthropic, FakeOpenAI
from tests.fakes.openai_batch import embedding_for

FAKES = {"openai": (FakeOpenAI, "gpt-4o-mini", "/v1"), "anthropic": (FakeAnthropic, "claude-haiku-4-5", "")}
MAX_TICKS = 30


def chat_line(custom_id: str, model: str) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Question {custom_id}"}], "max_tokens": 20},
    }


@pytest.mark.parametrize("provider", list(FAKES))
async def test_a_chat_batch_routed_to_a_provider_returns_its_answers(settings, database_url, tmp_path, provider):
    fake_class, model, suffix = FAKES[provider]
    with fake_class().serve() as fake:
        fake.settings.polls_to_complete = 2
        app = create_app(
            settings.model_copy(
                update={
                    "database_url": database_url,
                    "batch_worker": "off",
                    "batch_poll_interval_s": 0.01,
                    f"{provider}_api_key": "test-key",
                    f"{provider}_base_url": fake.base_url + suffix,
                    "egress_rate_limit": "",
                    "files_dir": tmp_path / "files",
                }
            )
        )
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            runtime.batch.worker.calls.backoff.multiplier = 0.01
            transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
            async with openai.AsyncOpenAI(
                base_url="http://test/v1", api_key="unused", http_client=transport, max_retries=0
            ) as sdk:
                lines = "".join(json.dumps(chat_line(f"q{i}", model)) + "\n" for i in range(4)).encode()
                source = await sdk.files.create(file=("chat.jsonl", io.BytesIO(lines)), purpose="batch")
                batch = await sdk.batches.create(
                    input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                assert batch.model == model
                for _ in range(MAX_TICKS):
                    await runtime.batch.run_once()
                    batch = await sdk.batches.retrieve(batch.id)
                    if batch.status == "completed":
                        break
                assert batch.status == "completed" and batch.request_counts.completed == 4
                content = await sdk.files.content(batch.output_file_id)
                results = [json.loads(line) for line in content.text.splitlines()]
                assert sorted(r["custom_id"] for r in results) == [f"q{i}" for i in range(4)]
                for result in results:
                    body = result["response"]["body"]
                    assert result["response"]["status_code"] == 200 and result["error"] is None
                    assert body["choices"][0]["message"]["content"].startswith("answer to ")
                    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["completion_tokens"] == 7
                    if provider == "openai":
                        assert body["choices"][0]["message"]["content"] == f"answer to {result['custom_id']}"
                job = await runtime.batch.jobs.get(batch.id.removeprefix("batch_"))
                assert (job.provider, job.model) == (provider, model)


async def test_an_embeddings_batch_goes_to_openai_and_returns_its_vectors(settings, tmp_path):
    with FakeOpenAI().serve() as fake:
        app = create_app(
            settings.model_copy(
                update={
                    "batch_worker": "off",
                    "batch_poll_interval_s": 0.01,
                    "openai_api_key": "test-key",
                    "openai_base_url": fake.base_url + "/v1",
                    "egress_rate_limit": "",
                    "files_dir": tmp_path / "files",
                }
            )
        )
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
            async with openai.AsyncOpenAI(
                base_url="http://test/v1", api_key="unused", http_client=transport, max_retries=0
            ) as sdk:
                lines = "".join(
                    json.dumps(
                        {
                            "custom_id": f"e{i}",
                            "method": "POST",
                            "url": "/v1/embeddings",
                            "body": {"model": "text-embedding-3-small", "input": f"text {i}"},
                        }
                    )
                    + "\n"
                    for i in range(3)
                ).encode()
                source = await sdk.files.create(file=("emb.jsonl", io.BytesIO(lines)), purpose="batch")
                batch = await sdk.batches.create(
                    input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h"
                )
                for _ in range(MAX_TICKS):
                    await runtime.batch.run_once()
                    batch = await sdk.batches.retrieve(batch.id)
                    if batch.status == "completed":
                        break
                assert batch.status == "completed" and batch.request_counts.completed == 3
                content = await sdk.files.content(batch.output_file_id)
                for result in map(json.loads, content.text.splitlines()):
                    index = result["custom_id"].removeprefix("e")
                    assert result["response"]["body"]["data"][0]["embedding"] == embedding_for(f"text {index}")


async def test_a_key_not_granted_the_provider_cannot_create_its_batch(settings, tmp_path):
    with FakeOpenAI().serve() as fake:
        app = create_app(
            settings.model_copy(
                update={
                    "api_keys": "sk-user",
                    "batch_worker": "off",
                    "openai_api_key": "test-key",
                    "openai_base_url": fake.base_url + "/v1",
                    "files_dir": tmp_path / "files",
                }
            )
        )
        async with app.router.lifespan_context(app):
            transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
            async with openai.AsyncOpenAI(
                base_url="http://test/v1", api_key="sk-user", http_client=transport, max_retries=0
            ) as sdk:
                lines = (json.dumps(chat_line("q0", "gpt-4o-mini")) + "\n").encode()
                source = await sdk.files.create(file=("chat.jsonl", io.BytesIO(lines)), purpose="batch")
                with pytest.raises(openai.PermissionDeniedError, match="not granted provider 'openai'"):
                    await sdk.batches.create(
                        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
                    )
                assert (await sdk.batches.list()).data == []

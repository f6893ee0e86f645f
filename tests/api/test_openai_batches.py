"""The official `openai` client's Batch API flow against the server over real HTTP: upload a JSONL file, create a
batch, poll it, download its output; cancel, validation errors, pagination, deletion and tenant isolation."""

import asyncio
import io
import json

import httpx
import openai
import pytest

from tests.support.app import serving

POLL_S = 0.1
MAX_POLLS = 600


@pytest.fixture
def settings(settings, tmp_path):
    return settings.model_copy(
        update={
            "api_keys": "sk-test,sk-other",
            "files_dir": tmp_path / "files",
            "batch_poll_interval_s": 0.2,
            "ingress_rate_limit_generate": "off",
        }
    )


@pytest.fixture
async def sdk(live_app):
    base_url, app = live_app
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0) as client:
        client.app, client.server_url = app, base_url
        yield client


@pytest.fixture
async def other(live_app):
    base_url, _ = live_app
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-other", max_retries=0) as client:
        yield client


def completion_line(custom_id: str, prompt: str, model: str = "gpt2", max_tokens: int = 5, **extra) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra},
    }


def jsonl(lines: list[dict | str]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


async def upload(client: openai.AsyncOpenAI, lines: list[dict | str]) -> str:
    created = await client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    assert created.purpose == "batch" and created.bytes == len(jsonl(lines))
    return created.id


async def until(client: openai.AsyncOpenAI, batch_id: str, *statuses: str):
    for _ in range(MAX_POLLS):
        batch = await client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_a_completions_batch_runs_locally_and_its_output_matches_v1_completions(sdk):
    [served] = (await sdk.models.list()).data
    prompts = {f"req-{i}": f"Prompt number {i} says" for i in range(6)}
    file_id = await upload(sdk, [completion_line(cid, prompt, served.id) for cid, prompt in prompts.items()])
    batch = await sdk.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h", metadata={"team": "search"}
    )
    assert batch.id.startswith("batch_") and batch.status in ("validating", "in_progress")
    assert batch.metadata == {"team": "search"} and batch.request_counts.total == 6
    done = await until(sdk, batch.id, "completed")
    assert done.request_counts.completed == 6 and done.request_counts.failed == 0 and done.error_file_id is None
    assert done.completed_at >= done.created_at and done.in_progress_at is not None
    results = await lines_of(sdk, done.output_file_id)
    assert sorted(line["custom_id"] for line in results) == sorted(prompts)
    for line in results:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        direct = await sdk.completions.create(
            model=served.id, prompt=prompts[line["custom_id"]], max_tokens=5, temperature=0
        )
        assert body["object"] == "text_completion" and body["model"] == direct.model
        assert body["choices"][0]["text"] == direct.choices[0].text
        assert body["choices"][0]["finish_reason"] == direct.choices[0].finish_reason
        assert body["usage"] == direct.usage.model_dump(exclude_none=True)
    output = await sdk.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output"
    # The same job on the /batch front.
    async with httpx.AsyncClient(base_url=sdk.server_url, headers={"Authorization": "Bearer sk-test"}) as client:
        job = (await client.get(f"/batch/jobs/{batch.id.removeprefix('batch_')}")).json()
    assert job["status"] == "completed" and job["job_type"] == "openai-batch" and job["metadata"] == {"team": "search"}


async def test_cancel_keeps_the_finished_requests_in_the_output_file(sdk):
    file_id = await upload(sdk, [completion_line(f"r{i:03d}", f"Long story {i}", max_tokens=30) for i in range(60)])
    batch = await sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    for _ in range(MAX_POLLS):
        running = await sdk.batches.retrieve(batch.id)
        if running.request_counts.completed >= 1:
            break
        await asyncio.sleep(POLL_S)
    cancelling = await sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = await until(sdk, batch.id, "cancelled")
    assert done.cancelled_at is not None
    finished = await lines_of(sdk, done.output_file_id)
    failed = await lines_of(sdk, done.error_file_id)
    assert 1 <= len(finished) < 60 and len(finished) == done.request_counts.completed
    assert sorted(line["custom_id"] for line in finished + failed) == [f"r{i:03d}" for i in range(60)]
    assert {line["error"]["code"] for line in failed} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        await sdk.batches.cancel(batch.id)


async def test_an_invalid_file_fails_the_batch_with_the_lines_named_and_nothing_runs(sdk):
    lines = [
        completion_line("a", "fine"),
        "not json",
        completion_line("a", "again"),
        {**completion_line("b", "x"), "url": "/v1/chat/completions"},
        completion_line("c", "x", model="other-llm"),
        completion_line("d", "x", stop=["."]),
    ]
    batch = await sdk.batches.create(
        input_file_id=await upload(sdk, lines), endpoint="/v1/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.failed_at is not None and batch.output_file_id is None
    errors = {(error.line, error.code) for error in batch.errors.data}
    assert errors == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_endpoint"),
        (5, "mismatched_model"),
        (6, "invalid_request"),
    }
    assert batch.request_counts.total == 0
    unknown = await sdk.batches.create(
        input_file_id=await upload(sdk, [completion_line("a", "x", model="nobody")]),
        endpoint="/v1/completions",
        completion_window="24h",
    )
    assert [(e.line, e.code) for e in unknown.errors.data] == [(1, "model_not_found")]
    with pytest.raises(openai.BadRequestError):
        await sdk.batches.create(input_file_id="file-missing", endpoint="/v1/completions", completion_window="48h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.create(input_file_id="file-missing", endpoint="/v1/completions", completion_window="24h")


async def test_batches_and_files_list_page_by_page_and_delete(sdk):
    file_id = await upload(sdk, ["not json"])
    created = [
        await sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
        for _ in range(3)
    ]
    first = await sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == [created[2].id, created[1].id] and first.has_more
    second = await sdk.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == [created[0].id] and not second.has_more
    assert [b.id async for b in sdk.batches.list(limit=1)] == [b.id for b in reversed(created)]
    files = await sdk.files.list(purpose="batch")
    assert [f.id for f in files.data] == [file_id]
    assert (await sdk.files.delete(file_id)).deleted
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        await sdk.files.content(file_id)


async def test_another_tenants_files_and_batches_are_not_found(sdk, other):
    file_id = await upload(sdk, ["not json"])
    batch = await sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    for call in (
        lambda: other.files.retrieve(file_id),
        lambda: other.files.content(file_id),
        lambda: other.files.delete(file_id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            await call()
    assert (await other.batches.list()).data == [] and (await other.files.list()).data == []


async def test_uploads_are_bounded_by_max_batch_file_bytes_not_max_request_bytes(settings):
    limits = {"max_request_bytes": 500, "max_batch_file_bytes": 2000}
    async with serving(settings.model_copy(update={**limits, "batch_worker": "off"})) as client:
        headers = {"Authorization": "Bearer sk-test"}

        async def post(size: int) -> httpx.Response:
            return await client.post(
                "/v1/files", headers=headers, data={"purpose": "batch"}, files={"file": ("in.jsonl", b"x" * size)}
            )

        assert (await post(1500)).json()["bytes"] == 1500
        refused = await post(5000)
        assert refused.status_code == 413 and "MAX_BATCH_FILE_BYTES" in refused.json()["error"]["message"]
        wrong = await client.post(
            "/v1/files", headers=headers, data={"purpose": "fine-tune"}, files={"file": ("in.jsonl", b"x")}
        )
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
        assert (
            await client.post("/v1/completions", headers=headers, json={"model": "x", "prompt": "y" * 600})
        ).status_code == 413
    assert len(list(settings.files_dir.iterdir())) == 1

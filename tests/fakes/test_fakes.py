"""The fake providers, driven by the official SDKs through their base URLs: every lifecycle and every knob."""

import io
import json

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel, ValidationError

from tests.fakes import FakeAnthropic, FakeGemini, FakeOpenAI
from tests.fakes.openai_batch import embedding_for

FAST_RETRY = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.02, jitter=0.001)


def openai_client(fake: FakeOpenAI, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="test-key", max_retries=max_retries)


def anthropic_client(fake: FakeAnthropic, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.base_url, api_key="test-key", max_retries=max_retries)


def gemini_client(fake: FakeGemini, **options) -> genai.Client:
    return genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=fake.base_url, **options))


def chat_lines(keys: list[str], model: str = "gpt-4o-mini", url: str = "/v1/chat/completions") -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": key,
                "method": "POST",
                "url": url,
                "body": {"model": model, "messages": [{"role": "user", "content": f"question {key}"}]},
            }
        ).encode()
        + b"\n"
        for key in keys
    )


def openai_batch(client: openai.OpenAI, keys: list[str]) -> str:
    uploaded = client.files.create(file=("requests.jsonl", chat_lines(keys)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id


def jsonl(content: bytes) -> list[dict]:
    return [json.loads(line) for line in content.splitlines()]


def test_openai_batch_lifecycle(fake_openai: FakeOpenAI):
    fake_openai.settings.polls_to_complete, fake_openai.settings.input_tokens = 2, 30
    client = openai_client(fake_openai)
    content = chat_lines(["r0", "r1", "r2"])
    uploaded = client.files.create(file=("requests.jsonl", content), purpose="batch")
    assert (uploaded.purpose, uploaded.bytes) == ("batch", len(content))
    assert client.files.content(uploaded.id).read() == content

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"idempotency_key": "chunk-1"},
    )
    assert (batch.status, batch.metadata) == ("validating", {"idempotency_key": "chunk-1"})
    assert client.batches.retrieve(batch.id).status == "in_progress"
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (90, 21)

    lines = jsonl(client.files.content(done.output_file_id).read())
    assert {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in lines} == {
        key: f"answer to {key}" for key in ("r0", "r1", "r2")
    }
    assert all(line["response"]["body"]["usage"]["prompt_tokens"] == 30 for line in lines)

    for file_id in (uploaded.id, done.output_file_id):
        assert client.files.delete(file_id).deleted
    assert fake_openai.file_ids() == set()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert fake_openai.calls("GET", r"/v1/batches/batch_\w+")[0].headers["authorization"] == "Bearer test-key"


def test_openai_failed_items_out_of_order_and_expiry(fake_openai: FakeOpenAI):
    settings = fake_openai.settings
    settings.fail_item, settings.out_of_order, settings.expired_batches = (lambda key: key == "r1"), True, {2}
    client = openai_client(fake_openai)
    completed = client.batches.retrieve(openai_batch(client, ["r0", "r1", "r2"]))
    assert [line["custom_id"] for line in jsonl(client.files.content(completed.output_file_id).read())] == ["r2", "r0"]
    [failure] = jsonl(client.files.content(completed.error_file_id).read())
    assert (failure["custom_id"], failure["response"]["status_code"]) == ("r1", 400)
    assert failure["response"]["body"]["error"]["type"] == "invalid_request_error"

    expired = client.batches.retrieve(openai_batch(client, ["e0", "e1", "e2", "e3"]))
    assert (expired.status, expired.request_counts.completed, expired.request_counts.failed) == ("expired", 2, 2)
    assert {line["custom_id"] for line in jsonl(client.files.content(expired.output_file_id).read())} == {"e0", "e1"}
    errors = jsonl(client.files.content(expired.error_file_id).read())
    assert {(line["custom_id"], line["error"]["code"], line["response"]) for line in errors} == {
        ("e2", "batch_expired", None),
        ("e3", "batch_expired", None),
    }


def test_openai_fails_one_batch_while_others_succeed(fake_openai: FakeOpenAI):
    fake_openai.settings.failed_batches = {2}
    client = openai_client(fake_openai)
    batches = [client.batches.retrieve(openai_batch(client, [f"b{number}"])) for number in range(3)]
    assert [batch.status for batch in batches] == ["completed", "failed", "completed"]
    assert batches[1].errors.data[0].code == "token_limit_exceeded" and batches[1].output_file_id is None
    assert fake_openai.batches_created == 3


def test_openai_invalid_input_fails_at_validation(fake_openai: FakeOpenAI):
    client = openai_client(fake_openai)
    content = chat_lines(["ok"]) + chat_lines(["wrong-url"], url="/v1/embeddings")
    uploaded = client.files.create(file=("requests.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed" and failed.in_progress_at is None
    assert [(error.code, error.line) for error in failed.errors.data] == [("url_mismatch", 2)]


def test_openai_sdk_retries_429_on_create_honouring_retry_after(fake_openai: FakeOpenAI):
    fake_openai.settings.create_429s, fake_openai.settings.retry_after_s = 2, 0.01
    client = openai_client(fake_openai, max_retries=2)
    openai_batch(client, ["r0"])
    creates = fake_openai.calls("POST", "/v1/batches")
    assert [call.headers["x-stainless-retry-count"] for call in creates] == ["0", "1", "2"]
    assert fake_openai.batches_created == 1

    fake_openai.settings.create_429s = 3
    with pytest.raises(openai.RateLimitError) as refused:
        openai_batch(client, ["r1"])
    assert refused.value.response.headers["retry-after"] == "0.01"
    assert refused.value.code == "rate_limit_exceeded"
    assert (len(fake_openai.calls("POST", "/v1/batches")), fake_openai.batches_created) == (6, 1)


@pytest.mark.parametrize("step", ["upload", "create", "poll", "results"])
def test_openai_holds_back_the_first_answer_of_a_step(fake_openai: FakeOpenAI, step: str):
    fake_openai.settings.hold_at = step
    client = openai_client(fake_openai).with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        batch_id = openai_batch(client, ["r0"])
        client.files.content(client.batches.retrieve(batch_id).output_file_id)
    assert fake_openai.held.is_set()
    # Held only once: the client that takes over goes through.
    batch_id = openai_batch(client, ["r1"])
    client.files.content(client.batches.retrieve(batch_id).output_file_id)


def test_openai_list_pages_and_cancel_keeps_finished_items(fake_openai: FakeOpenAI):
    fake_openai.settings.polls_to_complete = 5
    client = openai_client(fake_openai)
    ids = [openai_batch(client, ["c0", "c1", "c2", "c3"]) for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [batch.id for batch in page.data] == ids[:0:-1] and page.has_more
    assert [batch.id for batch in client.batches.list(limit=2)] == ids[::-1]

    assert client.batches.cancel(ids[0]).status == "cancelling"
    cancelled = client.batches.retrieve(ids[0])
    assert (cancelled.status, cancelled.request_counts.completed) == ("cancelled", 2)
    errors = jsonl(client.files.content(cancelled.error_file_id).read())
    assert {(line["custom_id"], line["error"]["code"]) for line in errors} == {
        ("c2", "batch_cancelled"),
        ("c3", "batch_cancelled"),
    }
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(ids[0])


def test_openai_embeddings_batch_and_real_time_calls(fake_openai: FakeOpenAI):
    client = openai_client(fake_openai)
    line = {
        "custom_id": "v0",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": "some text"},
    }
    uploaded = client.files.create(file=("requests.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    [output] = jsonl(client.files.content(client.batches.retrieve(batch.id).output_file_id).read())
    assert output["response"]["body"]["data"][0]["embedding"] == embedding_for("some text")

    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert (chat.choices[0].message.content, chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        "answer to hello",
        12,
        7,
    )
    # The SDK asks for base64 unless told otherwise and decodes it itself.
    assert client.embeddings.create(model="text-embedding-3-small", input=["x"]).data[0].embedding == embedding_for("x")


def message_requests(keys: list[str]) -> list[dict]:
    return [
        {
            "custom_id": key,
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"question {key}"}],
            },
        }
        for key in keys
    ]


def test_anthropic_batch_lifecycle(fake_anthropic: FakeAnthropic):
    fake_anthropic.settings.polls_to_complete = 2
    client = anthropic_client(fake_anthropic)
    batch = client.messages.batches.create(requests=message_requests(["a0", "a1", "a2"]))
    assert (batch.processing_status, batch.request_counts.processing, batch.results_url) == ("in_progress", 3, None)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.succeeded == 3
    assert ended.results_url.startswith(fake_anthropic.base_url)

    results = {result.custom_id: result.result for result in client.messages.batches.results(batch.id)}
    assert {key: result.message.content[0].text for key, result in results.items()} == {
        key: f"answer to {key}" for key in ("a0", "a1", "a2")
    }
    assert {(result.message.usage.input_tokens, result.message.usage.output_tokens) for result in results.values()} == {
        (12, 7)
    }
    assert len(fake_anthropic.calls("GET", rf"/v1/messages/batches/{batch.id}/results")) == 1
    assert [item.id for item in client.messages.batches.list(limit=10)] == [batch.id]
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    assert fake_anthropic.calls("POST", "/v1/messages/batches")[0].headers["x-api-key"] == "test-key"


def test_anthropic_errored_and_expired_items_out_of_order(fake_anthropic: FakeAnthropic):
    settings = fake_anthropic.settings
    settings.fail_item, settings.out_of_order, settings.expired_batches = (lambda key: key == "a1"), True, {1}
    client = anthropic_client(fake_anthropic)
    batch = client.messages.batches.create(requests=message_requests(["a0", "a1", "a2", "a3"]))
    counts = client.messages.batches.retrieve(batch.id).request_counts
    assert (counts.succeeded, counts.errored, counts.expired) == (1, 1, 2)
    results = list(client.messages.batches.results(batch.id))
    assert [(result.custom_id, result.result.type) for result in results] == [
        ("a3", "expired"),
        ("a2", "expired"),
        ("a1", "errored"),
        ("a0", "succeeded"),
    ]
    assert results[2].result.error.error.type == "invalid_request_error"


def test_anthropic_fails_one_batch_while_others_succeed(fake_anthropic: FakeAnthropic):
    fake_anthropic.settings.failed_batches = {1}
    client = anthropic_client(fake_anthropic)
    failing, passing = (client.messages.batches.create(requests=message_requests([key])) for key in ("f0", "p0"))
    assert client.messages.batches.retrieve(failing.id).request_counts.errored == 1
    [result] = client.messages.batches.results(failing.id)
    assert (result.result.type, result.result.error.error.type) == ("errored", "api_error")
    assert client.messages.batches.retrieve(passing.id).request_counts.succeeded == 1


def test_anthropic_cancel_and_delete_rules(fake_anthropic: FakeAnthropic):
    fake_anthropic.settings.polls_to_complete = 3
    client = anthropic_client(fake_anthropic)
    batch = client.messages.batches.create(requests=message_requests(["c0", "c1"]))
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(batch.id)
    cancelling = client.messages.batches.cancel(batch.id)
    assert cancelling.processing_status == "canceling" and cancelling.cancel_initiated_at is not None
    counts = client.messages.batches.retrieve(batch.id).request_counts
    assert (counts.succeeded, counts.canceled) == (1, 1)
    assert [result.result.type for result in client.messages.batches.results(batch.id)] == ["succeeded", "canceled"]


def test_anthropic_sdk_retries_429_and_validates_custom_ids(fake_anthropic: FakeAnthropic):
    fake_anthropic.settings.create_429s, fake_anthropic.settings.retry_after_s = 1, 0.01
    client = anthropic_client(fake_anthropic, max_retries=2)
    client.messages.batches.create(requests=message_requests(["r0"]))
    assert (len(fake_anthropic.calls("POST", "/v1/messages/batches")), fake_anthropic.batches_created) == (2, 1)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.create(requests=message_requests(["not valid!"]))

    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    assert (message.content[0].text, message.usage.input_tokens) == ("answer to hello", 12)


def gemini_request(key: str) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": f"question {key}"}]}], "metadata": {"key": key}}


def test_gemini_inline_batch_lifecycle(fake_gemini: FakeGemini):
    fake_gemini.settings.polls_to_complete = 2
    client = gemini_client(fake_gemini)
    job = client.batches.create(
        model="gemini-2.5-flash", src=[gemini_request(key) for key in ("g0", "g1")], config={"display_name": "chunk-1"}
    )
    assert (job.state, job.display_name, job.name.startswith("batches/")) == ("JOB_STATE_PENDING", "chunk-1", True)
    assert client.batches.get(name=job.name).state == "JOB_STATE_RUNNING"
    done = client.batches.get(name=job.name)
    assert done.state == "JOB_STATE_SUCCEEDED" and done.end_time is not None
    answers = {item.metadata["key"]: item.response for item in done.dest.inlined_responses}
    assert {key: response.text for key, response in answers.items()} == {"g0": "answer to g0", "g1": "answer to g1"}
    assert answers["g0"].usage_metadata.prompt_token_count == 12
    assert (
        fake_gemini.calls("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent")[0].headers["x-goog-api-key"]
        == "test-key"
    )


def test_gemini_file_batch_with_resumable_upload_and_download(fake_gemini: FakeGemini):
    settings = fake_gemini.settings
    settings.fail_item, settings.out_of_order = (lambda key: key == "k1"), True
    client = gemini_client(fake_gemini)
    lines = b"".join(
        json.dumps({"key": key, "request": {"contents": [{"parts": [{"text": key}]}]}}).encode() + b"\n"
        for key in ("k0", "k1", "k2")
    )
    uploaded = client.files.upload(
        file=io.BytesIO(lines), config={"mime_type": "application/jsonl", "display_name": "requests"}
    )
    assert (uploaded.size_bytes, uploaded.mime_type, uploaded.display_name) == (
        len(lines),
        "application/jsonl",
        "requests",
    )
    start, finish = fake_gemini.calls("POST", "/upload/v1beta/files")
    assert (start.headers["x-goog-upload-command"], finish.headers["x-goog-upload-command"]) == (
        "start",
        "upload, finalize",
    )
    assert finish.body == lines

    job = client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    done = client.batches.get(name=job.name)
    results = jsonl(client.files.download(file=done.dest.file_name))
    assert [result["key"] for result in results] == ["k2", "k1", "k0"]
    by_key = {result["key"]: result for result in results}
    assert by_key["k0"]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "answer to k0"
    assert by_key["k1"]["error"]["code"] == 3
    with pytest.raises(genai_errors.ClientError):
        client.files.download(file=uploaded.name)

    client.files.delete(name=uploaded.name)
    client.files.delete(name=done.dest.file_name)
    assert fake_gemini.file_names() == set()


def test_gemini_failed_expired_and_cancelled_batches(fake_gemini: FakeGemini):
    fake_gemini.settings.failed_batches, fake_gemini.settings.expired_batches = {1}, {2}
    fake_gemini.settings.polls_to_complete = 2
    client = gemini_client(fake_gemini)
    names = [client.batches.create(model="gemini-2.5-flash", src=[gemini_request("x")]).name for _ in range(3)]
    client.batches.cancel(name=names[2])
    states = [client.batches.get(name=name) for name in names for _ in range(2)][1::2]
    assert [job.state for job in states] == ["JOB_STATE_FAILED", "JOB_STATE_EXPIRED", "JOB_STATE_CANCELLED"]
    assert all(job.dest is None for job in states)
    assert [job.name for job in client.batches.list(config={"page_size": 2})] == names[::-1]
    client.batches.delete(name=names[0])
    with pytest.raises(genai_errors.ClientError):
        client.batches.get(name=names[0])


def test_gemini_create_429_has_no_sdk_retry_unless_configured(fake_gemini: FakeGemini):
    fake_gemini.settings.create_429s, fake_gemini.settings.retry_after_s = 1, 0.01
    # Keep the client referenced: a google-genai Client closes its HTTP client when it is garbage collected.
    client = gemini_client(fake_gemini)
    with pytest.raises(genai_errors.ClientError) as refused:
        client.batches.create(model="gemini-2.5-flash", src=[gemini_request("x")])
    assert (refused.value.code, refused.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert refused.value.response.headers["retry-after"] == "0.01"

    fake_gemini.settings.create_429s = 1
    retrying = gemini_client(fake_gemini, retry_options=FAST_RETRY)
    retrying.batches.create(model="gemini-2.5-flash", src=[gemini_request("x")])
    assert (
        len(fake_gemini.calls("POST", r"/v1beta/models/[^/]+:batchGenerateContent")),
        fake_gemini.batches_created,
    ) == (3, 1)


class Report(BaseModel):
    summary: str
    findings: list[str]
    severity: str


STRUCTURED = types.GenerateContentConfig(response_mime_type="application/json", response_schema=Report)


def generate(client: genai.Client) -> types.GenerateContentResponse:
    return client.models.generate_content(
        model="gemini-2.5-flash-lite", contents="how are we doing?", config=STRUCTURED
    )


def test_gemini_generate_content_structured_output(fake_gemini: FakeGemini):
    client = gemini_client(fake_gemini)
    answer = generate(client)
    assert isinstance(answer.parsed, Report) and answer.usage_metadata.total_token_count == 19
    sent = fake_gemini.calls("POST", "/v1beta/models/gemini-2.5-flash-lite:generateContent")[0].json()
    assert sent["generationConfig"]["responseMimeType"] == "application/json"

    fake_gemini.settings.generate_answer = '{"summary": "slow", "findings": ["p95 high"], "severity": "warning"}'
    assert generate(client).parsed == Report(summary="slow", findings=["p95 high"], severity="warning")
    plain = client.models.generate_content(model="gemini-2.5-flash-lite", contents="hi")
    assert plain.text == fake_gemini.settings.generate_answer

    fake_gemini.settings.generate_bad_json = 1
    broken = generate(client)
    assert broken.parsed is None
    with pytest.raises(ValidationError):
        Report.model_validate_json(broken.text)


def test_gemini_generate_content_faults(fake_gemini: FakeGemini):
    settings = fake_gemini.settings
    settings.generate_503s = 2
    assert generate(gemini_client(fake_gemini, retry_options=FAST_RETRY)).parsed is not None
    assert len(fake_gemini.calls("POST", r"/v1beta/models/[^/]+:generateContent")) == 3

    settings.generate_429s, settings.retry_after_s = 1, 7
    with pytest.raises(genai_errors.ClientError) as limited:
        generate(gemini_client(fake_gemini))
    assert (limited.value.code, limited.value.response.headers["retry-after"]) == (429, "7")
    assert limited.value.details["error"]["details"][0]["retryDelay"] == "7s"

    settings.generate_hangs = 1
    with pytest.raises(httpx.TimeoutException):
        generate(gemini_client(fake_gemini, timeout=300))
    assert generate(gemini_client(fake_gemini, timeout=5000)).parsed is not None

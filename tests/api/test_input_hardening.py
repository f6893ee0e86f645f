"""Hostile or malformed request input: always a JSON 4xx naming what is wrong, never a 500 or an echo of the
input (issue 9, defects 1, 5, 6, 7, 8, 10)."""

import asyncio
import json
import math

import httpx
import pytest

from server.api.errors import EXCERPT_CHARS, excerpt

JSON = {"content-type": "application/json"}
LIMIT = 1024 * 1024  # the default MAX_REQUEST_BYTES
CHUNK = 64 * 1024


@pytest.fixture
def settings(settings):
    """conftest's settings with a short BODY_TIMEOUT_S (nothing else here sends a body slowly)."""
    return settings.model_copy(update={"body_timeout_s": 0.5})


async def post(client: httpx.AsyncClient, path: str, body: bytes, **headers: str) -> httpx.Response:
    return await client.post(path, content=body, headers={**JSON, **headers})


def the_error(response: httpx.Response) -> dict:
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    return error


@pytest.mark.parametrize(
    "path, body, loc",
    [
        ("/generate", '{"prompts": ["a"], "temperature": NaN}', ["body", "temperature"]),
        ("/generate", '{"prompts": ["a"], "temperature": Infinity}', ["body", "temperature"]),
        ("/generate", '{"prompts": ["a"], "temperature": -Infinity}', ["body", "temperature"]),
        ("/generate", '{"prompts": ["a"], "top_p": NaN}', ["body", "top_p"]),
        ("/generate", '{"prompts": ["a"], "max_length": NaN}', ["body", "max_length"]),
        ("/generate", '{"prompts": ["a"], "max_new_tokens": Infinity}', ["body", "max_new_tokens"]),
        ("/generate", '{"prompts": ["a"], "seed": -Infinity}', ["body", "seed"]),
        ("/generate", '{"prompts": [NaN]}', ["body", "prompts", 0]),
        ("/predict", '{"text": NaN}', ["body", "text"]),
    ],
)
async def test_non_finite_numbers_are_a_422_naming_the_field(app_client, path, body, loc):
    error = the_error(await post(app_client, path, body.encode()))
    assert error["loc"] == loc
    assert error["input"] in ("NaN", "Infinity", "-Infinity")


@pytest.mark.parametrize(
    "path, body, loc, what",
    [
        ("/generate", r'{"prompts": ["\ud800abc"]}', ["body", "prompts", 0], "lone surrogate U+D800"),
        ("/generate", r'{"prompts": ["fine", "x\udfff"]}', ["body", "prompts", 1], "lone surrogate U+DFFF"),
        ("/predict", r'{"text": "\ud800"}', ["body", "text"], "lone surrogate U+D800"),
        ("/predict", r'{"texts": ["a", "b", "c\udc00"]}', ["body", "texts", 2], "lone surrogate U+DC00"),
        (
            "/generate",
            r'{"prompts": ["a\u0000b"], "max_new_tokens": 2}',
            ["body", "prompts", 0],
            "NUL character (U+0000)",
        ),
        ("/predict", r'{"text": "\u0000"}', ["body", "text"], "NUL character (U+0000)"),
        # Python's json decodes UTF-8-encoded surrogates (CESU-8) too, to the same lone surrogates.
        ("/predict", b'{"text": "\xed\xa0\x80"}', ["body", "text"], "lone surrogate U+D800"),
    ],
)
async def test_strings_with_nul_or_lone_surrogates_are_a_422_naming_the_field(app_client, path, body, loc, what):
    error = the_error(await post(app_client, path, body if isinstance(body, bytes) else body.encode()))
    assert error["loc"] == loc and what in error["msg"]
    assert "\\u" in error["input"] or "\x00" in error["input"]  # echoed escaped, never as an unencodable character


async def test_an_invalid_body_is_answered_with_a_short_excerpt_of_it(app_client):
    body = json.dumps({"prompts": "x" * (LIMIT - 100)}).encode()
    response = await post(app_client, "/generate", body)
    error = the_error(response)
    assert error["loc"] == ["body", "prompts"] and error["input"] == "x" * EXCERPT_CHARS + "…"
    assert len(response.content) < 500


async def test_a_4_mb_body_is_refused_413_before_parsing_and_not_echoed(app_client):
    response = await post(app_client, "/generate", json.dumps({"prompts": "x" * 4_000_000}).encode())
    assert response.status_code == 413 and len(response.content) < 200
    assert "MAX_REQUEST_BYTES" in response.json()["detail"]
    assert response.headers["connection"] == "close"


class Chunks:
    """A request body of `count` chunks, sent only as the server reads them; counts what was read."""

    def __init__(self, count: int, stall_after: int | None = None):
        self.count = count
        self.stall_after = stall_after
        self.read = 0

    async def __aiter__(self):
        for _ in range(self.count):
            if self.read == self.stall_after:
                await asyncio.Event().wait()
            self.read += 1
            yield b" " * CHUNK


async def test_a_declared_content_length_over_the_limit_is_refused_without_reading_the_body(app_client):
    body = Chunks(640)
    response = await app_client.post("/generate", content=body, headers={**JSON, "content-length": str(640 * CHUNK)})
    assert response.status_code == 413 and "detail" in response.json()
    assert body.read == 0


async def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(app_client):
    body = Chunks(640)  # 40 MiB, chunked: no Content-Length
    response = await app_client.post("/generate", content=body, headers=JSON)
    assert response.status_code == 413 and "MAX_REQUEST_BYTES" in response.json()["detail"]
    assert body.read == LIMIT // CHUNK + 1 and response.headers["connection"] == "close"


async def test_a_body_that_stops_arriving_is_answered_408(app_client):
    body = Chunks(4, stall_after=1)
    response = await asyncio.wait_for(app_client.post("/generate", content=body, headers=JSON), timeout=30)
    assert response.status_code == 408 and "BODY_TIMEOUT_S" in response.json()["detail"]
    assert body.read == 1


async def test_body_limits_answer_after_the_rate_limiter_with_its_headers(settings):
    from server.main import create_app

    app = create_app(settings.model_copy(update={"ingress_rate_limit": "100/minute"}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        response = await client.post("/predict", content=Chunks(20), headers=JSON)
    assert response.status_code == 413 and "ratelimit" in response.headers


async def test_predict_locates_a_too_long_text_at_its_field(app_client):
    assert the_error(await app_client.post("/predict", json={"text": "a" * 4001}))["loc"] == ["body", "text"]
    response = await app_client.post("/predict", json={"texts": ["ok", "a" * 4001]})
    assert the_error(response)["loc"] == ["body", "texts", 1]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b'{"prompts": ["caf\xe9"]}', "not valid UTF-8 JSON"),
        (b'{"prompts": ["\xc3\x28"]}', "not valid UTF-8 JSON"),
        (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
        (b'{"prompts": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
        (b'{"prompts": ["a"], "seed": ' + b"9" * 5000 + b"}", "integer string conversion"),
    ],
    ids=["latin-1", "bad continuation byte", "10000 levels", "10000 levels in a field", "5000 digits"],
)
async def test_bodies_the_json_parser_refuses_are_a_422(app_client, body, reason):
    error = the_error(await post(app_client, "/generate", body))
    assert error["type"] == "json_invalid" and reason in error["msg"]


async def test_a_non_json_body_of_random_bytes_is_a_422(app_client):
    response = await app_client.post("/predict", content=bytes(range(256)), headers={"content-type": "text/plain"})
    assert the_error(response)["loc"] == ["body"]


@pytest.mark.parametrize(
    "fields, loc",
    [
        ({"max_new_tokens": "20"}, "max_new_tokens"),
        ({"seed": True}, "seed"),
        ({"temperature": "0.5"}, "temperature"),
        ({"max_length": 20.0}, "max_length"),
        ({"top_p": True}, "top_p"),
    ],
)
async def test_numbers_and_booleans_are_strict(app_client, fields, loc):
    response = await app_client.post("/generate", json={"prompts": ["a"], **fields})
    assert the_error(response)["loc"] == ["body", loc]


async def test_an_int_is_still_a_float(app_client):
    response = await app_client.post(
        "/generate", json={"prompts": ["a"], "temperature": 1, "top_p": 1, "seed": 3, "max_new_tokens": 2}
    )
    assert response.status_code == 200


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-308, 5e-324])
async def test_a_tiny_temperature_samples_instead_of_failing(app_client, temperature):
    # Found by test_fuzz: scores / temperature overflowed (or divided by a temperature that is 0 in float32) to NaN.
    response = await app_client.post(
        "/generate", json={"prompts": ["a"], "temperature": temperature, "seed": 1, "max_new_tokens": 2}
    )
    assert response.status_code == 200


async def test_an_unexpected_exception_is_a_json_500(app_client):
    async def boom() -> None:
        raise RuntimeError("bug")

    app_client.app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app_client.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    assert response.status_code == 500 and response.json() == {"detail": "internal server error"}


@pytest.mark.parametrize(
    "path, method, statuses",
    [
        ("/generate", "post", {400, 401, 408, 413, 422, 429, 500, 503, 504}),
        ("/predict", "post", {401, 408, 413, 422, 429, 500, 503, 504}),
        ("/history", "get", {401, 422, 429, 500, 503}),
        ("/history/{record_id}", "get", {401, 404, 422, 429, 500, 503}),
    ],
)
async def test_openapi_declares_every_error_status_with_its_schema(app_client, path, method, statuses):
    spec = (await app_client.get("/openapi.json")).json()
    responses = spec["paths"][path][method]["responses"]
    assert statuses <= set(map(int, responses))
    for status in statuses:
        ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert "detail" in schema["properties"], status
    if path == "/generate":
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/BlockedPromptOut")
        assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/RateLimitedOut")


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        -math.inf,
        10**400,
        "\ud800" * 500,
        "x" * 10_000,
        b"\xff" * 10_000,
        list(range(10_000)),
        {"k\udc00" * 50: [[[[["deep"]]]]]},
        [[[[[[[[[[[]]]]]]]]]]],
        {"prompts": ["Once upon a time"], "top_p": math.nan},
    ],
    ids=["nan", "-inf", "big int", "surrogates", "long str", "bytes", "long list", "odd key", "deep", "body"],
)
def test_an_excerpt_is_short_and_always_encodes(value):
    shown = excerpt(value)
    text = json.dumps(shown, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert len(shown if isinstance(shown, str) else text) <= EXCERPT_CHARS + 1


async def test_a_json_body_sent_without_its_content_type_is_a_422_that_says_so(app_client):
    refused = await app_client.post("/predict", content=b'{"text": "hi"}')
    assert refused.status_code == 422 and "content-type: application/json" in refused.json()["detail"][0]["msg"]
    openai = await app_client.post("/v1/completions", content=b'{"model": "x", "prompt": "hi"}')
    assert openai.status_code == 400 and "content-type: application/json" in openai.json()["error"]["message"]
    sent_as_json = await app_client.post("/predict", json=["not", "an", "object"])
    assert sent_as_json.status_code == 422 and "content-type" not in sent_as_json.json()["detail"][0]["msg"]

"""Property-based: whatever a client sends to /generate or /predict (non-finite numbers, lone surrogates, NUL,
huge strings, deep nesting, wrong types and content types, invalid UTF-8, random bytes), the answer is never a
5xx, and every error is JSON with a `detail` that echoes only excerpts of the input (issue 9, Acceptance).

Hypothesis runs in a worker thread, sending each request to the app on the test's event loop, so that each
property is a plain function and the number of requests it sent can be checked afterwards. Examples are
derandomized (the same requests every run) and generations stay tiny (at most a few new tokens).
"""

import asyncio
import json
from dataclasses import dataclass

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.errors import EXCERPT_CHARS

LIMIT = 1024 * 1024  # the default MAX_REQUEST_BYTES


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    content_type: str | None


# --- values -----------------------------------------------------------------------------------------------------

ODD_CHARACTERS = st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\ufeff", "\u202e", "\U0001f600"])
texts = st.text(max_size=30) | st.text(st.characters() | ODD_CHARACTERS, max_size=30)
prompts = st.text(min_size=1, max_size=30)  # valid ones, in any script (NUL aside: hypothesis rarely draws it)
huge_texts = st.sampled_from([4001, 50_000, LIMIT - 200, LIMIT + 1]).map(lambda n: "x" * n)
numbers = st.one_of(st.integers(), st.integers(-(10**40), 10**40), st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)
# Anything but a valid int: a valid max_new_tokens or max_length could ask for hundreds of tokens.
not_ints = values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
bad_ints = st.integers(max_value=1) | st.integers(min_value=257, max_value=10**30)


# Hypothesis favours the ends of a range, so the rare branch is a value in the middle.
def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy = values) -> st.SearchStrategy:
    """`valid` about four times in five, else `wild`: most requests get far enough to be computed."""
    return st.integers(0, 4).flatmap(lambda k: wild if k == 2 else valid)


def sometimes(extra: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    """`extra` about one time in eight, else nothing."""
    return st.integers(0, 7).flatmap(lambda k: extra if k == 3 else st.just({}))


prompt_lists = mostly(
    st.lists(prompts, min_size=1, max_size=4),
    st.lists(texts, max_size=40) | st.lists(huge_texts, min_size=1, max_size=2) | values,
)
lengths = mostly(
    st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3)})
    | st.fixed_dictionaries({"max_length": st.integers(2, 12)}),
    st.fixed_dictionaries({"max_new_tokens": bad_ints | not_ints})
    | st.fixed_dictionaries({"max_length": bad_ints | not_ints})
    | st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3), "max_length": st.integers(2, 12)}),
)
unknown_fields = st.dictionaries(texts, values, min_size=1, max_size=2)
generate_bodies = st.builds(
    lambda unknown, fields, length, missing: {
        key: value for key, value in {**unknown, **fields, **length}.items() if key not in missing
    },
    sometimes(unknown_fields),
    st.fixed_dictionaries(
        {"prompts": prompt_lists},
        optional={
            "temperature": mostly(st.floats(0, 5) | st.integers(0, 5)),
            "top_p": mostly(st.floats(0, 1, exclude_min=True)),
            "seed": mostly(st.integers(0, 2**63 - 1)),
        },
    ),
    lengths,
    sometimes(st.just({"prompts": None})),
)
predict_bodies = st.builds(
    lambda unknown, fields: {**unknown, **fields},
    sometimes(unknown_fields),
    mostly(
        st.fixed_dictionaries({"text": prompts})
        | st.fixed_dictionaries({"texts": st.lists(prompts, min_size=1, max_size=4)}),
        st.fixed_dictionaries(
            {}, optional={"text": texts | huge_texts | values, "texts": st.lists(texts, max_size=70) | values}
        ),
    ),
)

# --- bodies -----------------------------------------------------------------------------------------------------

JSON_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "application/problem+json"])
OTHER_TYPES = st.sampled_from(
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "",
        "no/such; =type",
        None,
    ]
)
INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])


def dumps(body: object) -> bytes:
    """As a client would send it: NaN and Infinity as Python writes them, lone surrogates as \\u escapes."""
    return json.dumps(body).encode()


@st.composite
def corrupted(draw: st.DrawFn, bodies: st.SearchStrategy) -> bytes:
    """A JSON body with invalid UTF-8 spliced in somewhere."""
    data = dumps(draw(bodies))
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(INVALID_UTF8) + data[at:]


def nested(opening: bytes, closing: bytes, depth: int, inside: bytes = b"") -> bytes:
    return opening * depth + inside + closing * depth


depths = st.integers(1, 20_000)
hostile_bodies = st.one_of(
    st.binary(max_size=300),
    depths.map(lambda d: nested(b"[", b"]", d)),
    depths.map(lambda d: b'{"prompts": ' + nested(b"[", b"]", d) + b"}"),
    depths.map(lambda d: b'{"text": ' + nested(b'{"a": ', b"}", d, b"1") + b"}"),
    depths.map(lambda d: b"[" * d),
    st.sampled_from(
        [
            b"",
            b"NaN",
            b"-Infinity",
            b"1e999",
            b'"\\ud800"',
            b"null",
            b"[]",
            b"{}",
            b"9" * 5000,
            b'{"prompts": ["a"], "max_new_tokens": 1, "seed": ' + b"9" * 5000 + b"}",
            b"\xef\xbb\xbf{}",
        ]
    ),
)


def requests_of(path: str, bodies: st.SearchStrategy) -> st.SearchStrategy[Request]:
    """JSON bodies half the time; else the same corrupted or with another content type, or hostile bytes."""
    return st.integers(0, 5).flatmap(
        lambda k: (
            st.builds(Request, st.just(path), bodies.map(dumps), JSON_TYPES)
            if k < 3
            else st.builds(Request, st.just(path), corrupted(bodies), JSON_TYPES)
            if k == 3
            else st.builds(Request, st.just(path), bodies.map(dumps), OTHER_TYPES)
            if k == 4
            else st.builds(Request, st.just(path), hostile_bodies, JSON_TYPES | OTHER_TYPES)
        )
    )


# --- the property -----------------------------------------------------------------------------------------------


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:1000])
    if response.status_code == 200:
        return
    assert response.headers["content-type"] == "application/json", response.headers
    assert len(response.content) < 32 * 1024
    detail = response.json()["detail"]
    if response.status_code == 422:
        for error in detail:
            assert {"type", "loc", "msg"} <= error.keys()
            shown = error.get("input")
            assert len(shown if isinstance(shown, str) else json.dumps(shown)) <= EXCERPT_CHARS + 1


async def fuzz(client: httpx.AsyncClient, requests: st.SearchStrategy[Request], examples: int) -> int:
    """Check `examples` generated requests against the app; returns how many were sent."""
    loop = asyncio.get_running_loop()
    sent = 0

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(requests)
    def property_(request: Request) -> None:
        nonlocal sent
        headers = {} if request.content_type is None else {"content-type": request.content_type}
        post = client.post(request.path, content=request.body, headers=headers)
        check(asyncio.run_coroutine_threadsafe(post, loop).result(timeout=60))
        sent += 1

    await asyncio.to_thread(property_)
    return sent


async def test_generate_never_answers_5xx_and_every_error_is_json(app_client):
    assert await fuzz(app_client, requests_of("/generate", generate_bodies), 1100) >= 1000


async def test_predict_never_answers_5xx_and_every_error_is_json(app_client):
    assert await fuzz(app_client, requests_of("/predict", predict_bodies), 1100) >= 1000

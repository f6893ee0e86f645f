import pytest
from fastapi import HTTPException

from server.api.pagination import decode_cursor, encode_cursor


def test_a_cursor_gives_back_the_parts_it_was_made_of():
    token = encode_cursor("2026-12-05T01:02:03+00:00", "job é/1")
    assert decode_cursor(token, 2) == ["2026-12-05T01:02:03+00:00", "job é/1"]
    assert token.isascii() and "/" not in token and "+" not in token


@pytest.mark.parametrize(
    "token",
    ["", "not base64!", encode_cursor("a"), "WzEsMl0=", "eyJhIjogMX0=", "bm90IGpzb24="],
    ids=["empty", "garbage", "wrong size", "not strings", "an object", "not json"],
)
def test_anything_else_is_a_422_naming_the_cursor(token):
    with pytest.raises(HTTPException) as caught:
        decode_cursor(token, 2)
    assert caught.value.status_code == 422
    assert caught.value.detail == [
        {"type": "value_error", "loc": ["query", "cursor"], "msg": "not a cursor of this list"}
    ]

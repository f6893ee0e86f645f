"""One paging style for every list of this API (`/history`, `/batch/jobs`, a job's items and results): the page
carries `next_cursor`, an opaque token, null on the last page; the client passes it back as `cursor`. The token
holds the sort key of the page's last row (base64 of a JSON list of strings), so a page stays right while rows are
added, and a token from another list is refused (422), not misread. The OpenAI-compatible routes keep OpenAI's own
`after` / `has_more` instead, which its clients send.
"""

import base64
import binascii
import json
from typing import Annotated

from fastapi import HTTPException, Query

Cursor = Annotated[str | None, Query(max_length=2000, description="`next_cursor` of the previous page")]


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def decode_cursor(cursor: str, size: int) -> list[str]:
    """The `size` parts `encode_cursor` was given, or a 422 naming the parameter."""
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(parts, list) and len(parts) == size and all(isinstance(p, str) for p in parts):
            return parts
    except (ValueError, binascii.Error):
        pass
    raise not_a_cursor()


def not_a_cursor() -> HTTPException:
    return HTTPException(422, [{"type": "value_error", "loc": ["query", "cursor"], "msg": "not a cursor of this list"}])

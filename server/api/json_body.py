"""JSON request bodies that fail to decode are a 422, whatever the reason.

FastAPI answers 422 only for `json.JSONDecodeError`; any other error of the parser (bytes that are not UTF-8,
nesting deeper than Python's recursion limit, an integer beyond its digit limit) became a 400 "There was an
error parsing the body". Routes with JSON bodies use `JSONBodyRoute`, whose request re-raises those as
`JSONDecodeError` (FastAPI's documented way to customise the request: a custom `APIRoute`).
"""

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body)
            except json.JSONDecodeError:
                raise
            except UnicodeDecodeError as exc:
                raise json.JSONDecodeError(
                    f"body is not valid {exc.encoding.upper()} JSON ({exc.reason} at byte {exc.start})", "", exc.start
                ) from None
            except RecursionError:
                raise json.JSONDecodeError("body nested too deeply", "", 0) from None
            except ValueError as exc:
                raise json.JSONDecodeError(str(exc), "", 0) from None
        return self._json


class JSONBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_json_body(request: Request) -> Response:
            return await handler(JSONBodyRequest(request.scope, request.receive))

        return with_json_body

"""Server-sent events for streamed generations: `data:` lines of JSON, `event: error` for a failure after the
stream started (never a broken connection), and `data: [DONE]` at the end, as OpenAI's streams do."""

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi.sse import EventSourceResponse, format_sse_event

from server.services.analytics.request_log import status_of
from server.services.serving.streaming import GenerationStream, StreamEvent

log = logging.getLogger(__name__)
Render = Callable[[StreamEvent], Iterable[dict]]
RenderError = Callable[[int, str], dict]


def _data(payload: dict | str) -> bytes:
    return format_sse_event(data_str=payload if isinstance(payload, str) else json.dumps(payload))


async def _frames(
    stream: GenerationStream, render: Render, render_error: RenderError, closing: Callable[[], Iterable[dict]]
) -> AsyncIterator[bytes]:
    try:
        async for event in stream.events():
            for payload in render(event):
                yield _data(payload)
        for payload in closing():
            yield _data(payload)
    except Exception as exc:
        status = status_of(exc)
        if status >= 500:
            log.warning("streamed generation failed after it started: %s", exc)
        yield format_sse_event(event="error", data_str=json.dumps(render_error(status, str(exc) or type(exc).__name__)))
    yield _data("[DONE]")


def event_stream(
    stream: GenerationStream,
    render: Render,
    render_error: RenderError,
    closing: Callable[[], Iterable[dict]] = lambda: (),
) -> EventSourceResponse:
    """The response for a started stream; the client going away closes the iterator, which cancels the request."""
    return EventSourceResponse(
        _frames(stream, render, render_error, closing), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )

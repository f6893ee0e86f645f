from collections.abc import Iterable
from typing import cast

from fastapi import APIRouter, HTTPException, Request, Response

from server.api.cancellation import unless_disconnected
from server.api.deps import CacheBypassDep, GenerationDep, PrincipalDep, RespondAsyncDep, RuntimeDep, accepted, x_cache
from server.api.json_body import JSONBodyRoute
from server.api.responses import MODEL_ROUTE_ERRORS, error_responses
from server.api.serving.schemas import GenerateRequest, GenerationOut, Usage
from server.api.sse import event_stream
from server.services.serving.generation import GenerationOptions, GenerationResult
from server.services.serving.streaming import ItemDone, StreamEvent

router = APIRouter(tags=["models"], route_class=JSONBodyRoute)

STREAM_DOC = {
    "text/event-stream": {
        "description": (
            'With `"stream": true`: `data: {"index", "text", "token_ids"}` per new chunk of a prompt\'s text (prompts '
            'interleave), `data: {"index", "finish_reason", "usage", ...}` when a prompt is done, `event: error` if '
            "the request fails after the stream started, and `data: [DONE]` last."
        )
    }
}


def _out(r: GenerationResult) -> GenerationOut:
    return GenerationOut(
        id=r.id,
        prompt=r.prompt,
        generated_text=r.generated_text,
        completion=r.completion,
        model_name=r.model_name,
        created_at=r.created_at,
        finish_reason=r.finish_reason,
        usage=Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
        cached=r.cached,
    )


def _render(event: StreamEvent) -> Iterable[dict]:
    if isinstance(event, ItemDone):
        # GenerationService's streams end each item with its GenerationResult.
        done = _out(cast(GenerationResult, event.result)).model_dump(
            mode="json", exclude={"prompt", "generated_text", "completion"}
        )
        return [{"index": event.index, **done}]
    return [{"index": event.index, "text": event.text, "token_ids": event.token_ids}]


@router.post(
    "/generate",
    response_model=list[GenerationOut],
    responses={200: {"content": STREAM_DOC}, **error_responses(400, *MODEL_ROUTE_ERRORS)},
)
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    service: GenerationDep,
    bypass: CacheBypassDep,
    runtime: RuntimeDep,
    deferred: RespondAsyncDep,
    principal: PrincipalDep,
) -> list[GenerationOut] | Response:
    """Continue each prompt with the causal LM; one object per prompt, in order. `X-Cache` says HIT, MISS or
    PARTIAL; greedy and seeded requests are cached, unseeded sampling never is. With `"stream": true`: server-sent
    events as tokens are decoded. With `Prefer: respond-async`: 202 at once, one batch item per prompt, run by
    the local models when interactive work leaves them idle."""
    options = GenerationOptions(
        max_new_tokens=body.max_new_tokens,
        max_length=body.max_length,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    if deferred:
        if body.stream:
            raise HTTPException(400, "a deferred request (Prefer: respond-async) cannot stream")
        return accepted(await runtime.batch.defer_generation(principal, body.prompts, options))
    if body.stream:
        stream = await service.open_stream(body.prompts, options, tenant=principal.tenant, bypass_cache=bypass)
        return event_stream(stream, _render, lambda status, detail: {"status": status, "detail": detail})
    results = await unless_disconnected(
        request, service.generate(body.prompts, options, tenant=principal.tenant, bypass_cache=bypass)
    )
    response.headers["X-Cache"] = x_cache([r.cached for r in results])
    return [_out(r) for r in results]

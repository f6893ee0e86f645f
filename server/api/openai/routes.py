"""`/v1/models`, `/v1/completions`, `/v1/chat/completions`: the official `openai` client works against these.

Requests run through the same service as /generate (cache, limits, API keys, records); only the shapes differ."""

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.cancellation import unless_disconnected
from server.api.deps import CacheBypassDep, GenerationDep, PrincipalDep, RuntimeDep, x_cache
from server.api.json_body import JSONBodyRoute
from server.api.openai.errors import error_body
from server.api.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Sampling,
    Usage,
)
from server.api.responses import MODEL_ROUTE_ERRORS, error_responses
from server.api.sse import event_stream
from server.ml.sampling import TokenLogprob
from server.services.serving.generation import GenerationOptions, GenerationResult, GenerationService, Prompt
from server.services.serving.streaming import ItemDone, StreamEvent, TextChunk

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JSONBodyRoute)
STARTED = int(time.time())
# JSON has no -inf; vLLM reports an impossible token's log-probability as this.
MIN_LOGPROB = -9999.0
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "description": 'With `"stream": true`: OpenAI\'s chunks as `data:` lines, then `data: [DONE]`'
            }
        }
    }
}


def _options(body: Sampling) -> GenerationOptions:
    return GenerationOptions(
        max_new_tokens=body.new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stops,
        top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
    )


def _logprobs(
    token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int, decode: Callable[[list[int]], str]
) -> CompletionLogprobs:
    """OpenAI's `logprobs` object for these tokens, whose text starts at `offset` in the choice's text."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, entry in zip(token_ids, entries, strict=True):
        text = decode([token])
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        # As OpenAI's: the chosen token is always among the alternatives, so there may be one more than asked.
        top = {decode([t]): max(logprob, MIN_LOGPROB) for t, logprob in entry.top}
        top.setdefault(text, max(entry.logprob, MIN_LOGPROB))
        out.token_logprobs.append(max(entry.logprob, MIN_LOGPROB))
        out.top_logprobs.append(top)
    return out


def _usage(results: Iterable[GenerationResult]) -> Usage:
    prompt = completion = 0
    for r in results:
        prompt, completion = prompt + r.prompt_tokens, completion + r.completion_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _unknown_model(body: Sampling, service: GenerationService, request: Request) -> JSONResponse | None:
    if request.app.state.runtime.model_name(body.model) == service.generator.name:
        return None
    return JSONResponse(
        error_body(
            404,
            f"The model `{body.model}` does not exist (this server serves `{service.generator.name}`).",
            "model",
            "model_not_found",
        ),
        404,
    )


async def _answer(
    request: Request,
    response: Response,
    service: GenerationService,
    bypass: bool,
    tenant: str,
    body: Sampling,
    prompts: list[Prompt],
    chunk: Callable[[int, str | None, str | None], dict],
    whole: Callable[[list[GenerationResult]], object],
    options: GenerationOptions | None = None,
    scored: Callable[[TextChunk], dict] | None = None,
):
    """Run the prompts; a stream of `chunk(index, text, finish_reason)` dicts (with `scored(text_chunk)` as the
    choice's `logprobs`, when given), or `whole(results)`."""
    options = options or _options(body)
    if body.stream:
        stream = await service.open_stream(prompts, options, tenant=tenant, bypass_cache=bypass)
        finished: list[GenerationResult] = []

        def render(event: StreamEvent) -> Iterable[dict]:
            if isinstance(event, ItemDone):
                # GenerationService's streams end each item with its GenerationResult.
                result = cast(GenerationResult, event.result)
                finished.append(result)
                return [chunk(event.index, None, result.finish_reason)]
            if scored is not None and (event.text or event.token_ids):
                payload = chunk(event.index, event.text, None)
                payload["choices"][0]["logprobs"] = scored(event)
                return [payload]
            return [chunk(event.index, event.text, None)] if event.text else []

        def closing() -> Iterable[dict]:
            return [chunk(-1, None, None) | {"usage": _usage(finished).model_dump()}] if body.include_usage else []

        return event_stream(stream, render, lambda status, detail: error_body(status, detail), closing)
    results = await unless_disconnected(request, service.generate(prompts, options, tenant=tenant, bypass_cache=bypass))
    response.headers["X-Cache"] = x_cache([r.cached for r in results])
    return whole(results)


@router.get("/models", response_model=ModelList)
async def models(runtime: RuntimeDep) -> ModelList:
    """The served generator, as OpenAI lists models."""
    return ModelList(data=[ModelCard(id=runtime.generator.name, created=STARTED, owned_by="inference-server")])


@router.post(
    "/completions", response_model=Completion, responses={**STREAM_DOC, **error_responses(*MODEL_ROUTE_ERRORS)}
)
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    service: GenerationDep,
    bypass: CacheBypassDep,
    principal: PrincipalDep,
) -> Completion | Response:
    """OpenAI's legacy completions: one choice per prompt (`index` = the prompt's position)."""
    if refusal := _unknown_model(body, service, request):
        return refusal
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.generator.name,
    }
    prompts = body.prompts
    echoed: set[int] = set()
    decode = service.generator.decoder.text
    options = replace(
        _options(body), logprobs=body.logprobs, prompt_logprobs=bool(body.echo) and body.logprobs is not None
    )
    offsets = [0] * len(prompts)

    def chunk(index: int, text: str | None, finish: str | None) -> dict:
        if index < 0:
            return meta | {"choices": []}
        if body.echo and index not in echoed:
            echoed.add(index)
            text = service.text(prompts[index]) + (text or "")
        return meta | {"choices": [{"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}]}

    def scored(event: TextChunk) -> dict:
        """A streamed chunk's log-probabilities, offsets counted from the start of its choice's text (a stream
        with log-probabilities does not echo)."""
        logprobs = _logprobs(event.token_ids, event.logprobs, offsets[event.index], decode)
        offsets[event.index] += sum(map(len, logprobs.tokens))
        return logprobs.model_dump()

    def logprobs_of(r: GenerationResult) -> CompletionLogprobs | None:
        if r.logprobs is None:
            return None
        ids = [entry.token for entry in r.logprobs]
        entries: list[TokenLogprob | None] = list(r.logprobs)
        if body.echo:
            ids, entries = [*r.prompt_ids, *ids], [*(r.prompt_logprobs or [None] * len(r.prompt_ids)), *entries]
        return _logprobs(ids, entries, 0, decode)

    def whole(results: list[GenerationResult]) -> Completion:
        choices = [
            CompletionChoice(
                text=(r.prompt if body.echo else "") + r.completion,
                index=i,
                logprobs=logprobs_of(r),
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        return Completion(
            id=meta["id"], created=meta["created"], model=meta["model"], choices=choices, usage=_usage(results)
        )

    return await _answer(
        request,
        response,
        service,
        bypass,
        principal.tenant,
        body,
        prompts,
        chunk,
        whole,
        options,
        scored if body.logprobs is not None else None,
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**STREAM_DOC, **error_responses(400, *MODEL_ROUTE_ERRORS)},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    service: GenerationDep,
    bypass: CacheBypassDep,
    principal: PrincipalDep,
) -> ChatCompletion | Response:
    """Chat, for a model whose tokenizer has a chat template. GPT-2 has none: 400, as vLLM answers, rather than a
    guessed prompt format."""
    if refusal := _unknown_model(body, service, request):
        return refusal
    prompt = service.generator.chat_prompt([m.model_dump() for m in body.messages])
    if prompt is None:
        return JSONResponse(
            error_body(
                400,
                f"The model `{service.generator.name}` has no chat template, so this "
                "server cannot form a chat prompt for it; use /v1/completions instead.",
                "messages",
                "chat_template_missing",
            ),
            400,
        )
    meta = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": service.generator.name,
    }
    started: set[int] = set()

    def chunk(index: int, text: str | None, finish: str | None) -> dict:
        if index < 0:
            return meta | {"choices": []}
        delta = {} if finish else {"content": text or ""}
        if index not in started:
            started.add(index)
            delta["role"] = "assistant"
        return meta | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def whole(results: list[GenerationResult]) -> ChatCompletion:
        [r] = results
        return ChatCompletion(
            id=meta["id"],
            created=meta["created"],
            model=meta["model"],
            usage=_usage(results),
            choices=[
                ChatChoice(index=0, message=AssistantMessage(content=r.completion), finish_reason=r.finish_reason)
            ],
        )

    return await _answer(request, response, service, bypass, principal.tenant, body, [prompt], chunk, whole)

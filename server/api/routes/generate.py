from fastapi import APIRouter, Request, Response

from server.api.cancellation import unless_disconnected
from server.api.deps import CacheBypassDep, GenerationDep, RespondAsyncDep, RuntimeDep, accepted, x_cache
from server.api.json_body import JSONBodyRoute
from server.api.responses import MODEL_ROUTE_ERRORS, error_responses
from server.api.schemas import GenerateRequest, GenerationOut, Usage
from server.services.generation import GenerationOptions

router = APIRouter(tags=["models"], route_class=JSONBodyRoute)


@router.post("/generate", response_model=list[GenerationOut],
             responses=error_responses(400, *MODEL_ROUTE_ERRORS))
async def generate(body: GenerateRequest, request: Request, response: Response, service: GenerationDep,
                   bypass: CacheBypassDep, runtime: RuntimeDep, deferred: RespondAsyncDep) -> list[GenerationOut]:
    """Continue each prompt with the causal LM; one object per prompt, in order. `X-Cache` says HIT, MISS or
    PARTIAL; greedy and seeded requests are cached, unseeded sampling never is. With `Prefer: respond-async`:
    202 at once, one batch item per prompt, run by the local models when interactive work leaves them idle."""
    options = GenerationOptions(max_new_tokens=body.max_new_tokens, max_length=body.max_length,
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    if deferred:
        return accepted(await runtime.batch.defer_generation(body.prompts, options))
    results = await unless_disconnected(request, service.generate(body.prompts, options, bypass_cache=bypass))
    response.headers["X-Cache"] = x_cache([r.cached for r in results])
    return [GenerationOut(id=r.id, prompt=r.prompt, generated_text=r.generated_text, completion=r.completion,
                          model_name=r.model_name, created_at=r.created_at, finish_reason=r.finish_reason,
                          usage=Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
                          cached=r.cached)
            for r in results]

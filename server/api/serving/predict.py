from dataclasses import asdict
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.cancellation import unless_disconnected
from server.api.deps import CacheBypassDep, PrincipalDep, RespondAsyncDep, RuntimeDep, SentimentDep, accepted, x_cache
from server.api.json_body import JSONBodyRoute
from server.api.responses import MODEL_ROUTE_ERRORS, error_responses
from server.api.serving.schemas import PredictionOut, PredictRequest

router = APIRouter(tags=["models"], route_class=JSONBodyRoute)


@router.post(
    "/predict", response_model=PredictionOut | list[PredictionOut], responses=error_responses(*MODEL_ROUTE_ERRORS)
)
async def predict(
    body: PredictRequest,
    request: Request,
    response: Response,
    service: SentimentDep,
    bypass: CacheBypassDep,
    runtime: RuntimeDep,
    deferred: RespondAsyncDep,
    principal: PrincipalDep,
) -> PredictionOut | list[PredictionOut] | JSONResponse:
    """Sentiment of `text` (one object) or of each of `texts` (a list, in order). `X-Cache` as for /generate.
    `Prefer: respond-async` as for /generate."""
    texts = [body.text] if body.text is not None else body.texts
    if texts is None:
        raise RuntimeError("PredictRequest validates that one of text or texts is given")
    field: Literal["text", "texts"] = "text" if body.text is not None else "texts"
    if deferred:
        return accepted(await runtime.batch.defer_prediction(principal, texts, field))
    answers = await unless_disconnected(
        request, service.predict(texts, tenant=principal.tenant, bypass_cache=bypass, field=field)
    )
    response.headers["X-Cache"] = x_cache([r.cached for r in answers])
    results = [PredictionOut(**asdict(r)) for r in answers]
    return results[0] if body.text is not None else results

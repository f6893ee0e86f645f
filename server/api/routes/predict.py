from dataclasses import asdict

from fastapi import APIRouter, Request, Response

from server.api.cancellation import unless_disconnected
from server.api.deps import CacheBypassDep, RespondAsyncDep, RuntimeDep, SentimentDep, accepted, x_cache
from server.api.schemas import ErrorOut, PredictionOut, PredictRequest

router = APIRouter(tags=["models"])


@router.post("/predict", response_model=PredictionOut | list[PredictionOut],
             responses={503: {"model": ErrorOut}, 504: {"model": ErrorOut}})
async def predict(body: PredictRequest, request: Request, response: Response, service: SentimentDep,
                  bypass: CacheBypassDep, runtime: RuntimeDep, deferred: RespondAsyncDep
                  ) -> PredictionOut | list[PredictionOut]:
    """Sentiment of `text` (one object) or of each of `texts` (a list, in order). `X-Cache` as for /generate.
    `Prefer: respond-async` as for /generate."""
    texts = [body.text] if body.text is not None else body.texts
    if deferred:
        return accepted(await runtime.batch.defer_prediction(texts))
    answers = await unless_disconnected(request, service.predict(texts, bypass_cache=bypass))
    response.headers["X-Cache"] = x_cache([r.cached for r in answers])
    results = [PredictionOut(**asdict(r)) for r in answers]
    return results[0] if body.text is not None else results

from dataclasses import asdict

from fastapi import APIRouter, Request

from server.api.cancellation import unless_disconnected
from server.api.deps import SentimentDep
from server.api.schemas import ErrorOut, PredictionOut, PredictRequest

router = APIRouter(tags=["models"])


@router.post("/predict", response_model=PredictionOut | list[PredictionOut],
             responses={503: {"model": ErrorOut}, 504: {"model": ErrorOut}})
async def predict(body: PredictRequest, request: Request,
                  service: SentimentDep) -> PredictionOut | list[PredictionOut]:
    """Sentiment of `text` (one object) or of each of `texts` (a list, in order)."""
    texts = [body.text] if body.text is not None else body.texts
    results = [PredictionOut(**asdict(r)) for r in await unless_disconnected(request, service.predict(texts))]
    return results[0] if body.text is not None else results

"""Sentiment requests: each text is a batch item; equal texts in one batch are classified once."""

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from server.db.models import PredictionRecord
from server.ml.classifier import Sentiment, SentimentClassifier
from server.services.batching import MicroBatcher
from server.services.errors import FieldError, InputError
from server.services.recording import RecordWriter


@dataclass(frozen=True)
class PredictionResult:
    id: str
    text: str
    label: str
    score: float
    model_name: str
    created_at: datetime


class SentimentService:
    def __init__(self, classifier: SentimentClassifier, batcher: MicroBatcher[str, Sentiment],
                 recorder: RecordWriter, *, max_text_chars: int, timeout_s: float):
        self.classifier = classifier
        self.batcher = batcher
        self.recorder = recorder
        self.max_text_chars = max_text_chars
        self.timeout_s = timeout_s

    async def predict(self, texts: list[str]) -> list[PredictionResult]:
        started = time.perf_counter()
        errors = [FieldError(("body", "texts", i), f"text is {len(t)} characters; MAX_PROMPT_CHARS is "
                                                   f"{self.max_text_chars}")
                  for i, t in enumerate(texts) if len(t) > self.max_text_chars]
        if errors:
            raise InputError(errors)
        outputs = await self.batcher.submit(texts, timeout_s=self.timeout_s)
        created = datetime.now(UTC)
        results = [PredictionResult(uuid.uuid4().hex, text, out.label, out.score, self.classifier.name, created)
                   for text, out in zip(texts, outputs)]
        latency_ms = (time.perf_counter() - started) * 1000
        self.recorder.add(PredictionRecord, [
            {"id": r.id, "text": r.text, "label": r.label, "score": r.score, "model": r.model_name,
             "latency_ms": latency_ms, "created_at": r.created_at} for r in results])
        return results

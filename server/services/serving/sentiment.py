"""Sentiment requests: each text is answered from the cache or classified as its own batch item."""

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from server.core import clock
from server.db.models import PredictionRecord
from server.ml.classifier import Sentiment, SentimentClassifier
from server.services.analytics.request_log import RequestLog
from server.services.cache import SERVED_FROM_CACHE, ResponseCache
from server.services.cache.keys import cache_key, normalise_text
from server.services.errors import FieldError, InputError
from server.services.records import RecordWriter
from server.services.scheduling.interface import BACKGROUND_TIMEOUT_S, Batcher


@dataclass(frozen=True)
class PredictionResult:
    id: str
    text: str
    label: str
    score: float
    model_name: str
    created_at: datetime
    cached: bool


class SentimentService:
    def __init__(
        self,
        classifier: SentimentClassifier,
        batcher: Batcher[str, Sentiment],
        cache: ResponseCache,
        recorder: RecordWriter,
        *,
        max_text_chars: int,
        timeout_s: float,
    ):
        self.classifier = classifier
        self.batcher = batcher
        self.cache = cache
        self.recorder = recorder
        self.requests = RequestLog(recorder, "predict", classifier.name)
        self.max_text_chars = max_text_chars
        self.timeout_s = timeout_s

    def key(self, text: str, scope: str | None) -> str:
        return cache_key("predict", self.classifier.name, self.classifier.revision, normalise_text(text), {}, scope)

    def check(self, texts: list[str], field: Literal["text", "texts"] = "texts") -> None:
        """Every problem with the texts at once, as a 422 would list them; `field` is the body field the texts
        came in (`text`: the one text, located without an index)."""
        errors = [
            FieldError(
                ("body", "text") if field == "text" else ("body", "texts", i),
                f"text is {len(t)} characters; MAX_PROMPT_CHARS is {self.max_text_chars}",
            )
            for i, t in enumerate(texts)
            if len(t) > self.max_text_chars
        ]
        if errors:
            raise InputError(errors)

    async def predict(
        self,
        texts: list[str],
        *,
        tenant: str,
        bypass_cache: bool = False,
        background: bool = False,
        field: Literal["text", "texts"] = "texts",
    ) -> list[PredictionResult]:
        """Classify each text for `tenant`; `background` as for `GenerationService.generate`, `field` as for
        `check`."""
        started = time.perf_counter()
        try:
            results = await self._compute(texts, tenant, bypass_cache, background, field)
        except BaseException as exc:
            if not background:
                self.requests.failed(started, exc, tenant)
            raise
        if not background:
            latency_ms = (time.perf_counter() - started) * 1000
            self.recorder.add(
                PredictionRecord,
                [
                    {
                        "id": r.id,
                        "tenant": tenant,
                        "text": r.text,
                        "label": r.label,
                        "score": r.score,
                        "model": r.model_name,
                        "latency_ms": latency_ms,
                        "created_at": r.created_at,
                        "cached": r.cached,
                    }
                    for r in results
                ],
            )
            self.requests.answered(started, tenant, items=len(results), cached_items=sum(r.cached for r in results))
        return results

    async def _compute(
        self, texts: list[str], tenant: str, bypass_cache: bool, background: bool, field: Literal["text", "texts"]
    ) -> list[PredictionResult]:
        self.check(texts, field)

        timeout_s = BACKGROUND_TIMEOUT_S if background else self.timeout_s

        async def compute(index: int) -> bytes:
            [output] = await self.batcher.submit([texts[index]], background=background, timeout_s=timeout_s)
            return json.dumps({"label": output.label, "score": output.score}).encode()

        answers = await self.cache.resolve(
            "predict",
            [self.key(t, self.cache.scope(tenant)) for t in texts],
            compute,
            bypass=bypass_cache,
            admit=self.batcher.admission,
            timeout_s=timeout_s,
            background=background,
        )
        created = clock.now()
        results = []
        for text, (data, outcome) in zip(texts, answers, strict=True):
            out = Sentiment(**json.loads(data))
            results.append(
                PredictionResult(
                    uuid.uuid4().hex,
                    text,
                    out.label,
                    out.score,
                    self.classifier.name,
                    created,
                    cached=outcome in SERVED_FROM_CACHE,
                )
            )
        return results

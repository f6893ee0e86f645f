"""Sentiment classification (any sequence-classification model) over a batch of texts."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification

from server.ml.loader import PretrainedModel


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float


class SentimentClassifier(PretrainedModel):
    """A loaded classifier and its tokenizer. `classify` blocks: call it from the executor only."""

    auto_class = AutoModelForSequenceClassification
    # Each token of each text is a row of every Linear layer: one short text, and a batch of them.
    kernel_rows = (32, 512)

    def classify(self, texts: Sequence[str]) -> list[Sentiment]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
        scores, labels = probs.max(dim=-1)
        id2label = self.model.config.id2label
        # One copy from the device for the whole batch, not one per text.
        return [Sentiment(id2label[i], s) for s, i in zip(scores.tolist(), labels.tolist(), strict=True)]

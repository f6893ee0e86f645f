"""Sentiment classification (any sequence-classification model) over a batch of texts."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from server.ml.loader import ModelLocation, weights_revision


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float


class SentimentClassifier:
    """A loaded classifier and its tokenizer. `classify` blocks: call it from the executor only."""

    def __init__(self, model, tokenizer, name: str, revision: str, standin: bool):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.standin = standin

    @classmethod
    def load(cls, location: ModelLocation, cache_dir: str) -> "SentimentClassifier":
        kwargs = {"cache_dir": cache_dir, "local_files_only": location.local_files_only}
        tokenizer = AutoTokenizer.from_pretrained(location.path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(location.path, **kwargs)
        return cls(model, tokenizer, location.name, weights_revision(model.config, location), location.standin)

    def classify(self, texts: Sequence[str]) -> list[Sentiment]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
        scores, labels = probs.max(dim=-1)
        id2label = self.model.config.id2label
        return [Sentiment(id2label[int(i)], float(s)) for s, i in zip(scores, labels)]

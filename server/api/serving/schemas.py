"""The bodies of `/generate`, `/predict` and `/history` (the HTTP contract; see docs/api.md)."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.schemas import UtcDatetime
from server.core.request_types import REQUEST_CONFIG, Prompt


class GenerateRequest(BaseModel):
    model_config = REQUEST_CONFIG | ConfigDict(
        json_schema_extra={"examples": [{"prompts": ["Once upon a time"], "max_new_tokens": 20}]}
    )

    prompts: list[Prompt] = Field(min_length=1, max_length=32)
    max_new_tokens: int | None = Field(None, ge=1, le=256, description="New tokens per prompt (default 50)")
    max_length: int | None = Field(
        None, ge=2, le=1_000_000, description="Total tokens, prompt included (instead of max_new_tokens)"
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Makes sampling reproducible")
    stream: bool = Field(
        False,
        description="Answer `text/event-stream`: token chunks as they are decoded, then "
        "each prompt's final event, then `[DONE]`",
    )

    @model_validator(mode="after")
    def one_length(self) -> "GenerateRequest":
        if self.max_new_tokens is not None and self.max_length is not None:
            raise ValueError("give max_new_tokens or max_length, not both")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerationOut(BaseModel):
    id: str
    prompt: str
    generated_text: str
    completion: str
    model_name: str
    created_at: datetime
    finish_reason: Literal["stop", "length"]
    usage: Usage
    cached: bool = Field(
        description="True when this item was not computed for this request (cache hit, or "
        "answered by a concurrent identical request's computation)"
    )


class PredictRequest(BaseModel):
    model_config = REQUEST_CONFIG | ConfigDict(json_schema_extra={"examples": [{"text": "I love this!"}]})

    text: Prompt | None = None
    texts: list[Prompt] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def one_input(self) -> "PredictRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of text or texts")
        return self


class PredictionOut(BaseModel):
    id: str
    text: str
    label: str
    score: float
    model_name: str
    created_at: datetime
    cached: bool


class GenerationHistoryItem(BaseModel):
    """A stored generation: the fields of a /generate answer, plus what was asked and how long it took."""

    kind: Literal["generation"] = "generation"
    id: str
    prompt: str
    generated_text: str
    completion: str
    model_name: str
    params: dict
    finish_reason: str
    usage: Usage
    latency_ms: float
    cached: bool
    created_at: UtcDatetime


class PredictionHistoryItem(BaseModel):
    """A stored prediction: the fields of a /predict answer, plus how long it took."""

    kind: Literal["prediction"] = "prediction"
    id: str
    text: str
    label: str
    score: float
    model_name: str
    latency_ms: float
    cached: bool
    created_at: UtcDatetime


HistoryItem = Annotated[GenerationHistoryItem | PredictionHistoryItem, Field(discriminator="kind")]


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")

"""Request bodies checked where work is accepted (`POST /batch/jobs`, `.../requests`, `/batch/queue`), per provider and
kind, so that a body no provider (or model) can run is a 422 naming its custom_id and field, not a job that fails
hours later. `local` items follow the interactive API's own rules (the same strict types and bounds as /generate
and /predict); a `local` generate job must name the model this server serves (its `/v1/models` id, or its
configured id GENERATOR_MODEL, e.g. `gpt2`). Provider bodies are checked for what the adapters read; other fields go
to OpenAI and Anthropic as given (their APIs judge them), while Gemini's adapter reads only the fields below.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from server.core.request_types import REQUEST_CONFIG, Prompt, Text, storable
from server.services.errors import FieldError, InputError

PROVIDER_CONFIG = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class LocalGenerate(BaseModel):
    model_config = REQUEST_CONFIG
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1, le=256)
    max_new_tokens: int | None = Field(None, ge=1, le=256)
    max_length: int | None = Field(None, ge=2, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)


class LocalPredict(BaseModel):
    model_config = REQUEST_CONFIG
    text: Prompt


class Message(BaseModel):
    model_config = PROVIDER_CONFIG
    role: Literal["system", "user", "assistant"]
    content: Any

    @field_validator("content")
    @classmethod
    def _text_or_parts(cls, content: Any) -> str | list[dict]:
        # Not a `Text | list[dict]` union: pydantic would report one error per member, each located under the
        # member's type label, for a content that is neither.
        if isinstance(content, str):
            return storable(content)
        if isinstance(content, list) and all(isinstance(part, dict) for part in content):
            return content
        raise PydanticCustomError("content_type", "Input should be a string or a list of content parts (objects)")


class Chat(BaseModel):
    model_config = PROVIDER_CONFIG
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)


class GeminiMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "user", "assistant", "model"]
    content: Text


class GeminiChat(BaseModel):
    model_config = REQUEST_CONFIG
    messages: list[GeminiMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)


class Embedding(BaseModel):
    model_config = PROVIDER_CONFIG
    input: Prompt


class Embeddings(BaseModel):
    """`input` as a list: a model of its own rather than a `Prompt | list[Prompt]` union, whose errors pydantic
    locates under each member's type label (`function-after[...]`, with an address) instead of the item's index."""

    model_config = PROVIDER_CONFIG
    input: list[Prompt] = Field(min_length=1)


def _embedding(body: dict) -> type[BaseModel]:
    return Embeddings if isinstance(body.get("input"), list) else Embedding


Schema = type[BaseModel] | Callable[[dict], type[BaseModel]]
SCHEMAS: dict[tuple[str, str], Schema] = {
    ("local", "generate"): LocalGenerate,
    ("local", "predict"): LocalPredict,
    ("openai", "chat"): Chat,
    ("openai", "embedding"): _embedding,
    ("anthropic", "chat"): Chat,
    ("gemini", "chat"): GeminiChat,
}


def check_model(provider: str, kind: str, model: str, accepted: frozenset[str], loc: tuple[str | int, ...]) -> None:
    """A local generate job runs on the served generator (`accepted`: its names): another model name is refused,
    not silently replaced."""
    if provider != "local" or kind != "generate":
        return
    if model not in accepted:
        raise InputError(
            [
                FieldError(
                    loc, f"model {model!r} is not served here: use {' or '.join(sorted(accepted))} (GET /v1/models)"
                )
            ]
        )


def check_bodies(provider: str, kind: str, bodies: Sequence[tuple[str, dict]], loc: tuple[str | int, ...]) -> None:
    """422 listing each body (`custom_id`, body) that `provider`'s `kind` cannot run, by position under `loc`."""
    schema = SCHEMAS.get((provider, kind))
    if schema is None:
        return
    errors = []
    for index, (custom_id, body) in enumerate(bodies):
        model: type[BaseModel] = schema if isinstance(schema, type) else schema(body)
        try:
            model.model_validate(body)
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"]) or "body"
                errors.append(
                    FieldError((*loc, index, *error["loc"]), f"request {custom_id!r}: {field}: {error['msg']}")
                )
    if errors:
        raise InputError(errors)

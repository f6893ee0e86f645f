"""Request and answer bodies of the OpenAI-compatible routes, as OpenAI's API reference defines them."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.core.request_types import REQUEST_CONFIG, Prompt

Stop = Annotated[str, Field(min_length=1, max_length=200)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1, max_length=100_000)]
DEFAULT_MAX_TOKENS = 16
Zero = Annotated[float, Field(ge=0, le=0)]


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class Sampling(BaseModel):
    """What both completion routes take. Parameters this server cannot honour are refused (400), never ignored."""

    model_config = REQUEST_CONFIG
    model: str
    max_tokens: int | None = Field(None, ge=1, le=256, description="New tokens (default 16)")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    n: Literal[1] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    presence_penalty: Zero | None = None
    frequency_penalty: Zero | None = None
    logit_bias: Annotated[dict, Field(max_length=0)] | None = None
    # The extensions of vLLM, TGI and llama.cpp that serving benchmarks and evaluation harnesses send.
    top_k: int | None = Field(
        None, ge=-1, le=1_000_000, description="Sample from the k most likely tokens (0 or -1: all)"
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="transformers' repetition penalty (1: none)"
    )
    min_tokens: int | None = Field(
        None, ge=0, le=256, description="End-of-text is not generated before this many tokens"
    )
    ignore_eos: bool | None = Field(None, description="Keep generating after end-of-text, up to max_tokens")

    @model_validator(mode="after")
    def min_within_max(self) -> "Sampling":
        if (self.min_tokens or 0) > self.new_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.new_tokens})")
        return self

    @property
    def new_tokens(self) -> int:
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    """OpenAI's `POST /v1/completions`: one choice per prompt (`n` = 1); no `suffix` or `best_of` > 1. `max_tokens`
    may be 0 (with `echo` and `logprobs`: score the prompt alone, as evaluation harnesses do)."""

    model_config = REQUEST_CONFIG | ConfigDict(
        json_schema_extra={"examples": [{"model": "gpt2", "prompt": "Once upon a time", "max_tokens": 20}]}
    )

    prompt: (
        Prompt
        | Annotated[list[Prompt], Field(min_length=1, max_length=32)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=32)]
    )
    echo: bool | None = False
    max_tokens: int | None = Field(None, ge=0, le=256, description="New tokens (default 16)")
    best_of: Literal[1] | None = None
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Report each token's log-probability and this many most likely alternatives"
    )
    suffix: None = None

    @model_validator(mode="after")
    def streamable(self) -> "CompletionRequest":
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError("a streamed answer cannot echo the prompt with log-probabilities; ask without stream")
        return self

    @property
    def prompts(self) -> list[str | tuple[int, ...]]:
        """One per choice: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [tuple(self.prompt)]
        return [p if isinstance(p, str) else tuple(p) for p in self.prompt]


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=100_000)]


class ChatCompletionRequest(Sampling):
    """OpenAI's `POST /v1/chat/completions`: served only for a model whose tokenizer has a chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's `logprobs` of a completion choice: per token, its text, its log-probability, the most likely
    tokens there, and where it starts in the choice's `text`. The first prompt token (with `echo`) has none."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

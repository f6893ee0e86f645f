"""One structured-output call to Gemini's `generateContent` (google-genai SDK): the answer must fit a pydantic model.

The model is given to Gemini as the response schema (`response_mime_type="application/json"`); the answer is
validated against it, and one that does not fit raises `InvalidAnswer`. Every other failure comes out as a
`ProviderError` with the HTTP status and Retry-After (status None: no answer within `timeout_s`, or no connection).
Retries and the egress quota are the caller's (`services/analytics/report.py`).
"""

import asyncio
from typing import TypeVar

import httpx
from google import genai
from google.genai import types
from pydantic import BaseModel, ValidationError

from server.providers.base import ProviderError
from server.providers.errors import guarded

M = TypeVar("M", bound=BaseModel)
PROVIDER = "gemini"
OPERATION = "generate_content"


class InvalidAnswer(ProviderError):
    """Gemini answered, but not with JSON that fits the schema: a retry is no more likely to fit."""


class GeminiJson:
    def __init__(self, api_key: str, model: str, *, timeout_s: float, base_url: str | None = None):
        self.model = model
        self.timeout_s = timeout_s
        self.client = genai.Client(api_key=api_key, http_options=types.HttpOptions(base_url=base_url))

    async def generate(self, prompt: str, schema: type[M], *, temperature: float = 0.2) -> M:
        """Gemini's answer to `prompt` as an instance of `schema`."""
        config = types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=schema, temperature=temperature
        )

        async def call() -> types.GenerateContentResponse:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self.client.aio.models.generate_content(
                        model=self.model, contents=prompt, config=config
                    )
            except httpx.HTTPError as exc:  # no connection: the SDK lets httpx's own errors through
                raise ProviderError(PROVIDER, OPERATION, f"{type(exc).__name__}: {exc}") from exc

        response = await guarded(PROVIDER, OPERATION, call)
        try:
            return schema.model_validate_json(response.text or "")
        except ValidationError as exc:
            raise InvalidAnswer(
                PROVIDER,
                OPERATION,
                f"the answer does not fit the schema: {exc.error_count()} errors, first: {exc.errors()[0]['msg']}",
                status=200,
            ) from exc

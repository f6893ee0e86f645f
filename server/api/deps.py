"""Annotated dependencies: routes declare what they need, the lifespan's `Runtime` provides it."""

from typing import Annotated

from fastapi import Depends, Request

from server.services.generation import GenerationService
from server.services.runtime import Runtime
from server.services.sentiment import SentimentService


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_generation(runtime: RuntimeDep) -> GenerationService:
    return runtime.generation


def get_sentiment(runtime: RuntimeDep) -> SentimentService:
    return runtime.sentiment


GenerationDep = Annotated[GenerationService, Depends(get_generation)]
SentimentDep = Annotated[SentimentService, Depends(get_sentiment)]

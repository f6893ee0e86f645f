"""The naive recipe, for comparison only: one transformers pipeline call per HTTP request.

This is what the common FastAPI guides do (and the seed's "Optimizing AI Services" recipe): a sync
endpoint, so Starlette runs each request in its thread pool, each thread calling the shared pipeline.
Start: `BENCH_MODEL=<dir> uvicorn server.bench.baseline:app`.
"""

import os

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

generator = pipeline("text-generation", model=os.environ["BENCH_MODEL"])
if generator.tokenizer is None:
    raise RuntimeError(f"{os.environ['BENCH_MODEL']} has no tokenizer")
tokenizer = generator.tokenizer
tokenizer.pad_token = tokenizer.eos_token
app = FastAPI(title="naive baseline")


class GenerateRequest(BaseModel):
    prompts: list[str]
    max_new_tokens: int = 50


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/generate")
def generate(request: GenerateRequest) -> list[dict]:
    return [
        {
            "prompt": prompt,
            "generated_text": generator(
                prompt, max_new_tokens=request.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )[0]["generated_text"],
        }
        for prompt in request.prompts
    ]

"""Text generation requests: validation against the model's context, cache, batching, records.

A request's prompts become separate items: each is answered from the cache or computed as its own batch
item, so items from many requests fill one model call. Only deterministic items are cached (greedy, or
sampling with a seed); the key holds the prompt's token ids, so texts that tokenise alike share entries.
"""

import asyncio
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from server.core import clock
from server.db.models import GenerationRecord
from server.ml.generator import Generation, GenerationParams, TextGenerator
from server.ml.sampling import TokenLogprob
from server.services.analytics.request_log import RequestLog
from server.services.cache import SERVED_FROM_CACHE, ResponseCache
from server.services.cache.keys import cache_key
from server.services.cache.response_cache import Outcome
from server.services.errors import FieldError, InputError
from server.services.records import RecordWriter
from server.services.scheduling.interface import BACKGROUND_TIMEOUT_S, Batcher
from server.services.scheduling.static import ABORTED, Abandoned, Aborted
from server.services.serving.prompt_policy import PromptPolicy
from server.services.serving.streaming import GenerationStream


@dataclass(frozen=True)
class GenerationJob:
    """One prompt to continue; the batcher groups jobs by `params` and merges equal deterministic jobs. `scope` is
    the cache's scope (the tenant, or None when answers are shared): jobs of two scopes never merge, so joining a
    running computation cannot tell one tenant that another asked the same."""

    prompt_ids: tuple[int, ...]
    params: GenerationParams
    seed: int | None
    scope: str | None = None

    @property
    def deterministic(self) -> bool:
        return self.params.greedy or self.seed is not None


@dataclass(frozen=True)
class GenerationOptions:
    """What the client asked for; `max_length` (prompt included) and `max_new_tokens` exclude each other. `top_k`
    0 or -1 is off; `logprobs` is the number of alternatives reported per token (None: no log-probabilities), and
    `prompt_logprobs` reports the prompt's tokens' too (for `echo`)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class GenerationResult:
    id: str
    prompt: str
    generated_text: str
    completion: str
    model_name: str
    created_at: datetime
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    logprobs: list[TokenLogprob] | None = None
    prompt_ids: tuple[int, ...] = ()
    prompt_logprobs: list[TokenLogprob | None] | None = None


DEFAULT_MAX_NEW_TOKENS = 50
# A prompt is text, or token ids as OpenAI's completions take them (evaluation harnesses send their own tokenisation).
Prompt = str | tuple[int, ...]
EXTENSIONS = ("top_k", "repetition_penalty", "min_tokens", "ignore_eos", "logprobs", "prompt_logprobs")


def run_jobs(generator: TextGenerator, jobs: list[GenerationJob], abandoned: Abandoned) -> list[Generation | Aborted]:
    """The batcher's compute function: one `generate` call for jobs that share their params."""
    outputs = generator.generate(
        [job.prompt_ids for job in jobs], jobs[0].params, [job.seed for job in jobs], abandoned
    )
    return [ABORTED if output.finish_reason == "aborted" else output for output in outputs]


def encode_generation(output: Generation) -> bytes:
    fields = {"tokens": output.token_ids, "text": output.text, "finish": output.finish_reason}
    if output.logprobs is not None:
        fields["logprobs"] = [entry.encode() for entry in output.logprobs]
    if output.prompt_logprobs is not None:
        fields["prompt_logprobs"] = [entry and entry.encode() for entry in output.prompt_logprobs]
    return json.dumps(fields).encode()


def decode_generation(data: bytes) -> Generation:
    fields = json.loads(data)
    logprobs, prompt_logprobs = fields.get("logprobs"), fields.get("prompt_logprobs")
    return Generation(
        fields["tokens"],
        fields["text"],
        fields["finish"],
        None if logprobs is None else [TokenLogprob.decode(entry) for entry in logprobs],
        None if prompt_logprobs is None else [entry and TokenLogprob.decode(entry) for entry in prompt_logprobs],
    )


def described(job: GenerationJob) -> dict:
    """The job's parameters as its cache key and its record hold them: the extensions only where they are set, so
    a job without them keeps the key it always had."""
    params = job.params
    fields: dict[str, object] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": job.seed,
    }
    if params.stop:
        fields["stop"] = list(params.stop)
    defaults = GenerationParams(params.max_new_tokens)
    for name in EXTENSIONS:
        if (value := getattr(params, name)) != getattr(defaults, name):
            fields[name] = value
    return fields


class GenerationService:
    def __init__(
        self,
        generator: TextGenerator,
        batcher: Batcher[GenerationJob, Generation],
        cache: ResponseCache,
        recorder: RecordWriter,
        policy: PromptPolicy,
        *,
        max_prompt_chars: int,
        timeout_s: float,
    ):
        self.generator = generator
        self.policy = policy
        self.batcher = batcher
        self.cache = cache
        self.recorder = recorder
        self.requests = RequestLog(recorder, "generate", generator.name)
        self.max_prompt_chars = max_prompt_chars
        self.timeout_s = timeout_s

    def text(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self.generator.decoder.text(list(prompt))

    def plan(
        self, prompts: Sequence[Prompt], options: GenerationOptions, scope: str | None = None
    ) -> list[GenerationJob]:
        """Tokenise and check every prompt; all problems are reported at once, as a 422 would list them."""
        errors: list[FieldError] = []
        jobs: list[GenerationJob] = []
        context = self.generator.context_size
        for index, prompt in enumerate(prompts):
            loc = ("body", "prompts", index)
            if isinstance(prompt, tuple):
                if outside := [token for token in prompt if token >= self.generator.vocab_size]:
                    errors.append(
                        FieldError(
                            loc,
                            f"token id {outside[0]} is not in the model's vocabulary of {self.generator.vocab_size}",
                        )
                    )
                    continue
            elif len(prompt) > self.max_prompt_chars:
                errors.append(
                    FieldError(loc, f"prompt is {len(prompt)} characters; MAX_PROMPT_CHARS is {self.max_prompt_chars}")
                )
                continue
            ids = prompt if isinstance(prompt, tuple) else tuple(self.generator.encode(prompt))
            if not ids:
                errors.append(FieldError(loc, "prompt encodes to no tokens"))
                continue
            if options.max_length is not None:
                new_tokens = options.max_length - len(ids)
                if new_tokens < 1:
                    errors.append(
                        FieldError(
                            loc,
                            f"max_length {options.max_length} leaves no room for new tokens "
                            f"after this prompt's {len(ids)} tokens",
                        )
                    )
                    continue
            else:
                new_tokens = DEFAULT_MAX_NEW_TOKENS if options.max_new_tokens is None else options.max_new_tokens
            if len(ids) + new_tokens > context:
                errors.append(
                    FieldError(
                        loc,
                        f"prompt ({len(ids)} tokens) + {new_tokens} new tokens exceeds the "
                        f"model's context of {context} tokens",
                    )
                )
                continue
            sampled = options.temperature > 0
            params = GenerationParams(
                new_tokens,
                options.temperature,
                options.top_p if sampled else 1.0,
                options.stop,
                max(options.top_k, 0) if sampled else 0,
                options.repetition_penalty,
                options.min_tokens,
                options.ignore_eos,
                options.logprobs,
                options.prompt_logprobs,
            )
            jobs.append(GenerationJob(ids, params, options.seed if options.temperature else None, scope))
        if errors:
            raise InputError(errors)
        return jobs

    def key(self, job: GenerationJob) -> str | None:
        if not job.deterministic:
            return None
        return cache_key(
            "generate", self.generator.name, self.generator.revision, job.prompt_ids, described(job), job.scope
        )

    async def open_stream(
        self, prompts: Sequence[Prompt], options: GenerationOptions, *, tenant: str, bypass_cache: bool = False
    ) -> GenerationStream:
        """Start a streamed request; returns once it was admitted (else raises, as `generate` would)."""
        stream = GenerationStream(len(prompts), self.generator.decoder.text, options.stop)
        task = asyncio.create_task(
            self.generate(prompts, options, tenant=tenant, bypass_cache=bypass_cache, stream=stream)
        )
        await stream.started(task)
        return stream

    async def generate(
        self,
        prompts: Sequence[Prompt],
        options: GenerationOptions,
        *,
        tenant: str,
        bypass_cache: bool = False,
        background: bool = False,
        stream: GenerationStream | None = None,
    ) -> list[GenerationResult]:
        """Continue each prompt for `tenant` (whose records and cached answers they are). `background` work (the
        batch offload's `local` provider) yields to interactive requests in the batcher, has a long deadline, and
        is stored with its batch item, not in the history. With a `stream`, tokens and finished prompts are also
        reported to it as they come."""
        started = time.perf_counter()
        try:
            results, jobs = await self._compute(prompts, options, tenant, bypass_cache, background, stream)
        except BaseException as exc:
            if not background:
                self.requests.failed(started, exc, tenant)
            raise
        if not background:
            self._record(results, jobs, tenant, (time.perf_counter() - started) * 1000)
            self.requests.answered(
                started,
                tenant,
                items=len(results),
                cached_items=sum(r.cached for r in results),
                tokens_in=sum(r.prompt_tokens for r in results),
                tokens_out=sum(r.completion_tokens for r in results),
            )
        return results

    async def _compute(
        self,
        prompts: Sequence[Prompt],
        options: GenerationOptions,
        tenant: str,
        bypass_cache: bool,
        background: bool,
        stream: GenerationStream | None,
    ) -> tuple[list[GenerationResult], list[GenerationJob]]:
        texts = [self.text(prompt) for prompt in prompts]
        self.policy.check("generate", texts)
        jobs = self.plan(prompts, options, self.cache.scope(tenant))
        created = clock.now()

        timeout_s = BACKGROUND_TIMEOUT_S if background else self.timeout_s

        async def compute(index: int) -> bytes:
            on_tokens = partial(stream.tokens, index) if stream is not None else None
            outputs = await self.batcher.submit(
                [jobs[index]], background=background, timeout_s=timeout_s, on_tokens=on_tokens
            )
            return encode_generation(outputs[0])

        results: dict[int, GenerationResult] = {}

        def answered(index: int, data: bytes, outcome: Outcome) -> None:
            """Each item's result, made once: the stream's final event and the records carry the same id."""
            out, prompt, job = decode_generation(data), texts[index], jobs[index]
            results[index] = GenerationResult(
                id=uuid.uuid4().hex,
                prompt=prompt,
                generated_text=prompt + out.text,
                completion=out.text,
                model_name=self.generator.name,
                created_at=created,
                finish_reason=out.finish_reason,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(out.token_ids),
                cached=outcome in SERVED_FROM_CACHE,
                logprobs=out.logprobs,
                prompt_ids=job.prompt_ids,
                prompt_logprobs=out.prompt_logprobs,
            )
            if stream is not None:
                stream.done(index, out.token_ids, out.text, results[index], out.logprobs)

        @contextmanager
        def admit(count: int) -> Iterator[None]:
            with self.batcher.admission(count):
                if stream is not None:
                    stream.admitted.set()
                yield

        await self.cache.resolve(
            "generate",
            [self.key(job) for job in jobs],
            compute,
            bypass=bypass_cache,
            admit=admit,
            on_item=answered,
            timeout_s=timeout_s,
            background=background,
        )
        return [results[index] for index in range(len(jobs))], jobs

    def _record(
        self, results: list[GenerationResult], jobs: list[GenerationJob], tenant: str, latency_ms: float
    ) -> None:
        self.recorder.add(
            GenerationRecord,
            [
                {
                    "id": r.id,
                    "tenant": tenant,
                    "prompt": r.prompt,
                    "generated_text": r.generated_text,
                    "completion": r.completion,
                    "model": r.model_name,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "latency_ms": latency_ms,
                    "created_at": r.created_at,
                    "cached": r.cached,
                    "params": described(job),
                }
                for r, job in zip(results, jobs, strict=True)
            ],
        )

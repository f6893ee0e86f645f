"""Everything the server holds for its lifetime, built once at startup and closed at shutdown."""

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from server.core.config import Settings
from server.core.rate_policy import parse_policies, parse_policy
from server.core.supervisor import RestartPolicy
from server.core.tenants import KeyRing
from server.db import migrate
from server.db.session import create_engine, session_factory
from server.ml import configure_threads
from server.ml.allocator import keep_freed_memory
from server.ml.classifier import Sentiment, SentimentClassifier
from server.ml.device import default_batch_max_size, kernels_for, memory, placements
from server.ml.generator import Generation, TextGenerator
from server.ml.loader import locate
from server.providers.gemini_report import GeminiJson
from server.services.analytics.report import PerformanceReports
from server.services.analytics.service import Analytics
from server.services.cache import ResponseCache, open_store
from server.services.infra.health import Check, Health, server_health
from server.services.infra.redis_client import GuardedRedis, open_redis, warn_if_unreachable
from server.services.limits.egress import EgressGuard
from server.services.limits.gcra import MemoryLimiter, RedisLimiter
from server.services.limits.ingress import IngressLimits
from server.services.offload.factory import build_batch_offload, build_openai_batches
from server.services.offload.openai_batches import OpenAIBatches
from server.services.offload.service import BatchOffload
from server.services.records import RecordWriter
from server.services.records.replay import replay_at_start
from server.services.scheduling.continuous import ContinuousBatcher
from server.services.scheduling.interface import Batcher
from server.services.scheduling.static import MicroBatcher
from server.services.serving.generation import GenerationJob, GenerationService, run_jobs
from server.services.serving.prompt_policy import PromptPolicy
from server.services.serving.sentiment import SentimentService

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    redis: GuardedRedis | None
    keys: KeyRing
    ingress: IngressLimits
    egress: EgressGuard
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    generator: TextGenerator
    classifier: SentimentClassifier
    recorder: RecordWriter
    cache: ResponseCache
    generation: GenerationService
    sentiment: SentimentService
    batch: BatchOffload
    openai_batches: OpenAIBatches
    reports: PerformanceReports
    analytics: Analytics
    health: Health
    batchers: Mapping[str, Batcher[Any, Any]]
    """The schedulers by model (`generator`, `classifier`), as the metrics label them."""

    def model_name(self, name: str) -> str:
        """The served name of a model asked for by its configured id (GENERATOR_MODEL, SENTIMENT_MODEL): answers
        name the stand-in, precision or device (`offline-stand-in:gpt2`, `gpt2:int8`), clients ask for `gpt2`."""
        aliases = {
            self.settings.generator_model: self.generator.name,
            self.settings.sentiment_model: self.classifier.name,
        }
        return aliases.get(name, name)


def describe_models(generator: TextGenerator, classifier: SentimentClassifier) -> dict[str, dict]:
    return {
        role: {
            "name": model.name,
            "revision": model.revision,
            "precision": model.precision,
            "kernels": model.kernels,
            "kernels_reason": model.kernels_reason,
            "memory_pages": model.memory_pages,
            "head_screen": model.head_screen,
            "device": str(model.device),
            "dtype": model.placement.dtype_name,
            "offline_stand_in": model.standin,
        }
        for role, model in (("generator", generator), ("sentiment", classifier))
    }


async def load_models(settings: Settings, executor: Executor) -> tuple[TextGenerator, SentimentClassifier]:
    # Before any model is looked for or loaded: a refused device or dtype (DeviceRefused) ends the start at once.
    generator_on, classifier_on = placements(settings)
    cache = str(settings.models_cache_dir)
    generator_at = await asyncio.to_thread(
        locate, settings.generator_model, "generator", settings.model_source, settings.models_cache_dir
    )
    classifier_at = await asyncio.to_thread(
        locate, settings.sentiment_model, "classifier", settings.model_source, settings.models_cache_dir
    )
    loop = asyncio.get_running_loop()
    log.info("memory allocator: %s", keep_freed_memory())
    await loop.run_in_executor(executor, configure_threads, settings.torch_num_threads)
    return (
        await loop.run_in_executor(
            executor,
            TextGenerator.load,
            generator_at,
            cache,
            settings.generator_precision,
            kernels_for(settings.generator_fp32_kernels, generator_on),
            generator_on,
        ),
        await loop.run_in_executor(
            executor,
            SentimentClassifier.load,
            classifier_at,
            cache,
            settings.sentiment_precision,
            kernels_for(settings.sentiment_fp32_kernels, classifier_on),
            classifier_on,
        ),
    )


def torch_thread() -> ThreadPoolExecutor:
    """The one thread that runs torch: loading, every forward pass of both models.

    Each thread that enters torch gets its own OpenMP team, and an idle team's spinning workers take cores from
    the busy one: measured on 2 cores, a lone oneDNN request took 277 ms with every torch call on one thread and
    ~400 ms once a second thread had run torch. The models take turns instead: the generator's decoding loop
    gives the thread back after every step (services/scheduling/continuous.py)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")


def open_limits(settings: Settings, redis: GuardedRedis | None, keys: KeyRing) -> tuple[IngressLimits, EgressGuard]:
    """Both layers on one limiter: Redis (exact across replicas) when configured, else this process."""
    limiter = RedisLimiter(redis) if redis is not None else MemoryLimiter()
    fail_open = settings.rate_limit_fail_mode == "open"
    groups = {
        group: parse_policy(group, getattr(settings, f"ingress_rate_limit_{group}"))
        for group in ("generate", "predict", "analyze")
    }
    ingress = IngressLimits(
        limiter,
        parse_policy("default", settings.ingress_rate_limit),
        {group: policy for group, policy in groups.items() if policy},
        fail_open,
    )
    return ingress, EgressGuard(
        limiter, parse_policies(settings.egress_rate_limit), fail_open=fail_open, tenant_policies=keys.egress
    )


def open_reports(
    settings: Settings,
    redis: GuardedRedis | None,
    sessions: async_sessionmaker[AsyncSession],
    egress: EgressGuard,
    batchers: Mapping[str, Batcher[Any, Any]],
) -> PerformanceReports:
    """Reports cached for GEMINI_CACHE_TTL_S (Redis when configured: shared by replicas, with the stampede lock)."""
    gemini = (
        GeminiJson(
            settings.gemini_api_key,
            settings.gemini_model,
            timeout_s=settings.gemini_timeout_s,
            base_url=settings.gemini_base_url,
        )
        if settings.gemini_api_key
        else None
    )
    store = open_store(
        redis,
        ttl_s=settings.gemini_cache_ttl_s,
        max_items=settings.cache_max_items,
        lock_ttl_s=settings.cache_lock_ttl_s,
    )
    cache = ResponseCache(store, lock_ttl_s=settings.cache_lock_ttl_s, per_tenant=settings.cache_scope == "tenant")
    return PerformanceReports(
        sessions,
        cache,
        egress,
        gemini,
        settings.gemini_model,
        lambda: {name: float(batcher.queued) for name, batcher in batchers.items()},
        max_wait_s=settings.analyze_max_wait_s,
        backoff_s=settings.gemini_retry_backoff_s,
    )


class _BatcherOptions(TypedDict):
    """The settings both batchers take, as keywords."""

    executor: Executor
    max_batch_size: int
    max_wait_s: float
    queue_limit: int
    background_max_size: int | None
    stall_s: float
    restart: RestartPolicy


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    redis = open_redis(settings.redis_url, timeout_s=settings.redis_timeout_s) if settings.redis_url else None
    if redis is not None:
        await warn_if_unreachable(redis)
    keys = KeyRing.from_settings(settings.api_keys, settings.admin_api_keys, settings.api_keys_file)
    ingress, egress = open_limits(settings, redis, keys)
    if not keys.enabled:
        log.warning(
            "no API key is set: the server is OPEN to anyone who can reach it, as one tenant; set API_KEYS "
            "(or API_KEYS_FILE) to require 'Authorization: Bearer <key>'"
        )
    else:
        log.info(
            "API keys for %d tenant(s)%s",
            len(keys.tenants()),
            "; callers without a key are served (no ordinary key is set)" if keys.anonymous_allowed else "",
        )
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    executor = torch_thread()
    generator, classifier = await load_models(settings, executor)
    engine = create_engine(settings.database_url, timeout_s=settings.database_timeout_s)
    sessions = session_factory(engine)
    await replay_at_start(sessions, settings)
    recorder = RecordWriter.from_settings(sessions, settings)
    cache = ResponseCache(
        open_store(
            redis, ttl_s=settings.cache_ttl_s, max_items=settings.cache_max_items, lock_ttl_s=settings.cache_lock_ttl_s
        ),
        lock_ttl_s=settings.cache_lock_ttl_s,
        per_tenant=settings.cache_scope == "tenant",
    )
    batching: _BatcherOptions = {
        "executor": executor,
        "max_batch_size": settings.scheduler_max_size
        or default_batch_max_size(generator.placement, generator.model.config),
        "max_wait_s": settings.scheduler_max_wait_ms / 1000,
        "queue_limit": settings.scheduler_queue_limit,
        "background_max_size": settings.batch_background_max_size,
        "stall_s": settings.scheduler_stall_s,
        "restart": RestartPolicy(
            window_s=settings.scheduler_loop_failure_window_s, give_up_after=settings.scheduler_loop_max_failures
        ),
    }
    generate_batcher: Batcher[GenerationJob, Generation] = (
        ContinuousBatcher("generator", generator, **batching)
        if settings.generator_scheduler == "continuous"
        else MicroBatcher[GenerationJob, Generation](
            "generator",
            lambda jobs, abandoned: run_jobs(generator, jobs, abandoned),
            **batching,
            group_of=lambda job: job.params,
            dedup_key_of=lambda job: job if job.deterministic else None,
        )
    )
    # One forward pass has no step to stop at: an abandoned text's batch simply finishes.
    predict_batcher = MicroBatcher[str, Sentiment](
        "classifier", lambda texts, abandoned: classifier.classify(texts), **batching, dedup_key_of=lambda text: text
    )
    batchers: dict[str, Batcher[Any, Any]] = {"generator": generate_batcher, "classifier": predict_batcher}
    generation = GenerationService(
        generator,
        generate_batcher,
        cache,
        recorder,
        PromptPolicy.from_setting(settings.blocked_terms),
        max_prompt_chars=settings.max_prompt_chars,
        timeout_s=settings.request_timeout_s,
    )
    sentiment = SentimentService(
        classifier,
        predict_batcher,
        cache,
        recorder,
        max_text_chars=settings.max_prompt_chars,
        timeout_s=settings.request_timeout_s,
    )
    offload = build_batch_offload(settings, sessions, egress, generation, sentiment)
    reports = open_reports(settings, redis, sessions, egress, batchers)
    runtime = Runtime(
        settings,
        redis,
        keys,
        ingress,
        egress,
        engine,
        sessions,
        generator,
        classifier,
        recorder,
        cache,
        generation,
        sentiment,
        offload,
        build_openai_batches(settings, sessions, offload),
        reports,
        Analytics(sessions, reports, batchers, ingress, egress),
        server_health(
            {"generator": generate_batcher, "sentiment": predict_batcher},
            describe_models(generator, classifier),
            engine,
            recorder,
            redis,
        ),
        batchers,
    )
    batch = runtime.batch

    async def batch_check() -> Check:
        state = batch.health()
        return Check(state["status"], 0.0, state["tasks"])

    runtime.health.ready["batch"] = batch_check

    async def devices_check() -> Check:
        return Check("ok", 0.0, {str(device): memory(device) for device in {generator.device, classifier.device}})

    runtime.health.ready["devices"] = devices_check
    for batcher in batchers.values():
        batcher.start()
    recorder.start()
    if runtime.batch.in_process:
        runtime.batch.start()
    log.info(
        "serving %s and %s on %s, batches of up to %d (database %s, cache %s)",
        generator.name,
        classifier.name,
        generator.device,
        batching["max_batch_size"],
        engine.url.render_as_string(),
        cache.backend,
    )
    try:
        yield runtime
    finally:
        await runtime.batch.stop()
        for batcher in batchers.values():
            await batcher.close()
        await recorder.close()
        if redis is not None:
            await redis.aclose()
        await engine.dispose()
        executor.shutdown(wait=True)

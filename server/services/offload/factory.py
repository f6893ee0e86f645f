"""Builds the batch offload from the settings: adapters for the configured providers, worker, local runner."""

from datetime import timedelta
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core.config import Settings
from server.core.destinations import DestinationPolicy
from server.core.provider_names import LOCAL, PAID_PROVIDERS
from server.providers.anthropic_batch import AnthropicBatch
from server.providers.base import BatchLimits, BatchProvider
from server.providers.gemini_batch import GeminiBatch
from server.providers.openai_batch import OpenAIBatch
from server.services.limits.egress import EgressGuard
from server.services.offload.alerts import BatchAlerts, Thresholds
from server.services.offload.calls import ProviderCalls
from server.services.offload.files import FileStore
from server.services.offload.jobs import JobStore
from server.services.offload.lease import Lease
from server.services.offload.local import LocalRunner
from server.services.offload.openai_batches import ModelRoutes, OpenAIBatches
from server.services.offload.pricing import PriceTable
from server.services.offload.registry import ProviderRegistry
from server.services.offload.service import BatchOffload
from server.services.offload.webhooks import Webhooks
from server.services.offload.window import Window
from server.services.offload.worker import BatchWorker
from server.services.serving.generation import GenerationService
from server.services.serving.sentiment import SentimentService


def provider_limits(settings: Settings) -> dict[str, BatchLimits]:
    return {
        name: BatchLimits(getattr(settings, f"batch_{name}_max_requests"), getattr(settings, f"batch_{name}_max_bytes"))
        for name in PAID_PROVIDERS
    }


class Adapter(Protocol):
    def __call__(
        self, api_key: str, base_url: str | None, limits: BatchLimits, timeout_s: float = ...
    ) -> BatchProvider: ...


ADAPTERS: dict[str, Adapter] = {"openai": OpenAIBatch, "anthropic": AnthropicBatch, "gemini": GeminiBatch}


def build_adapters(settings: Settings) -> dict[str, BatchProvider]:
    """An adapter for each external provider whose API key is set (base URL from `<PROVIDER>_BASE_URL`)."""
    limits = provider_limits(settings)
    return {
        name: adapter(
            key, getattr(settings, f"{name}_base_url"), limits[name], timeout_s=settings.batch_provider_timeout_s
        )
        for name, adapter in ADAPTERS.items()
        if (key := getattr(settings, f"{name}_api_key"))
    }


def build_batch_offload(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    egress: EgressGuard,
    generation: GenerationService,
    sentiment: SentimentService,
) -> BatchOffload:
    adapters = build_adapters(settings)
    prices = PriceTable.load(settings.batch_prices_file, settings.batch_local_reference_price)
    lease = Lease(sessions, ttl_s=settings.batch_lease_ttl_s)
    destinations = DestinationPolicy.from_settings(settings.webhook_allow_http, settings.webhook_allowed_hosts)
    webhooks = Webhooks(sessions, secret=settings.batch_webhook_secret, destinations=destinations)
    thresholds = Thresholds(
        failure_rate=settings.batch_alert_failure_rate,
        max_age_h=settings.batch_alert_max_age_h,
        max_queued_items=settings.batch_alert_queued_items,
        savings_step_usd=settings.batch_alert_savings_step_usd,
    )
    alerts = BatchAlerts(sessions, thresholds, webhooks=webhooks, webhook_url=settings.alert_webhook_url)
    jobs = JobStore(sessions)
    worker = BatchWorker(
        sessions,
        adapters,
        provider_limits(settings),
        ProviderCalls(egress, max_backoff_s=settings.batch_provider_max_backoff_s),
        prices,
        lease,
        Window(settings.batch_schedule, settings.batch_timezone),
        alerts,
        webhooks,
        jobs,
        poll_interval_s=settings.batch_poll_interval_s,
        max_attempts=settings.batch_max_attempts,
    )
    runner = LocalRunner(
        sessions,
        jobs,
        generation,
        sentiment,
        concurrency=2 * settings.batch_background_max_size,
        max_attempts=settings.batch_max_attempts,
        holds_lease=lambda: lease.token is not None,
        item_done=worker.wake,
        requeue_s=settings.batch_local_requeue_s,
    )
    return BatchOffload(
        sessions,
        jobs,
        ProviderRegistry(frozenset({LOCAL, *adapters})),
        prices,
        worker,
        runner,
        generation,
        sentiment,
        destinations,
        generator_model=settings.generator_model,
        in_process=settings.batch_worker == "in-process",
    )


def build_openai_batches(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], offload: BatchOffload
) -> OpenAIBatches:
    files = FileStore(
        sessions,
        settings.files_dir,
        max_bytes=settings.max_batch_file_bytes,
        retention=timedelta(days=settings.files_retention_days),
    )
    return OpenAIBatches(sessions, offload, files, ModelRoutes.parse(settings.batch_model_routes))

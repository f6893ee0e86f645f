"""Settings, read once from the environment (and `.env`) with pydantic-settings.

Every field maps to the upper-case environment variable of the same name; `.env.example` lists them all.
"""

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    app_name: str = "inference-server"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"

    generator_model: str = "gpt2"
    sentiment_model: str = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    model_source: Literal["auto", "local", "hub"] = "auto"
    models_cache_dir: Path = PROJECT_ROOT / "models_cache"
    torch_num_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    batch_max_size: int = Field(32, ge=1, le=1024)
    batch_max_wait_ms: float = Field(5.0, ge=0)
    batch_queue_limit: int = Field(1024, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    max_prompt_chars: int = Field(4000, ge=1)
    blocked_terms: str = ""

    redis_url: str | None = None
    cache_ttl_s: float = Field(3600.0, gt=0)
    cache_max_items: int = Field(10000, ge=1)
    cache_lock_ttl_s: float = Field(30.0, gt=0)
    cache_allow_client_bypass: bool = False

    api_keys: str = ""
    metrics_require_key: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    ingress_rate_limit: str = "120/minute"
    ingress_rate_limit_generate: str = ""
    ingress_rate_limit_predict: str = ""
    ingress_rate_limit_analyze: str = ""
    egress_rate_limit: str = "gemini=10/minute,openai=60/minute,anthropic=50/minute"
    rate_limit_fail_mode: Literal["open", "closed"] = "open"

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    gemini_api_key: str | None = None
    gemini_base_url: str | None = None

    batch_worker: Literal["in-process", "off"] = "in-process"
    batch_schedule: str = "0 2 * * *"
    batch_timezone: str = "UTC"
    batch_poll_interval_s: float = Field(60.0, gt=0)
    batch_max_attempts: int = Field(3, ge=1)
    batch_lease_ttl_s: float = Field(120.0, gt=0)
    batch_background_max_size: int = Field(4, ge=1)
    batch_prices_file: Path | None = None
    batch_local_reference_price: str = "openai:gpt-4o-mini"
    batch_webhook_secret: str | None = None
    alert_webhook_url: str | None = None
    batch_alert_failure_rate: float = Field(0.10, ge=0, le=1)
    batch_alert_max_age_h: float = Field(48.0, gt=0)
    batch_alert_queued_items: int = Field(10_000, ge=0)
    batch_alert_savings_step_usd: float = Field(1000.0, gt=0)
    batch_openai_max_requests: int = Field(50_000, ge=1)
    batch_openai_max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    batch_anthropic_max_requests: int = Field(100_000, ge=1)
    batch_anthropic_max_bytes: int = Field(256 * 1024 * 1024, ge=1)
    batch_gemini_max_requests: int = Field(100_000, ge=1)
    batch_gemini_max_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1)

    database_url: str = f"sqlite+aiosqlite:///{PROJECT_ROOT / 'data' / 'server.db'}"
    record_flush_interval_ms: float = Field(200.0, gt=0)
    record_flush_max_items: int = Field(500, ge=1)
    record_spill_dir: Path = PROJECT_ROOT / "data" / "unflushed"

    @field_validator("batch_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: expected five fields, e.g. '0 2 * * *' (02:00 every day)")
        return value

    @field_validator("batch_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone: expected e.g. 'UTC' or 'Europe/Paris'") from None
        return value

    @field_validator("blocked_terms")
    @classmethod
    def _terms_file_exists(cls, value: str) -> str:
        if value.startswith("@") and not Path(value[1:]).is_file():
            raise ValueError(f"no file {value[1:]!r}: give comma-separated terms, or @path to a file of one term per line")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()

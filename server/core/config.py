"""Settings, read once from the environment (and `.env`) with pydantic-settings.

Every field maps to the upper-case environment variable of the same name; `.env.example` lists them all.
"""

import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.core import rate_policy

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_spill_dir() -> Path:
    """`$XDG_STATE_HOME/inference-server/spill` (XDG_STATE_HOME: ~/.local/state unless set to an absolute path)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    return (Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state") / "inference-server" / "spill"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    app_name: str = "inference-server"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    log_format: Literal["text", "json"] = "text"
    keep_alive_timeout_s: int = Field(5, ge=1)
    max_connections: int = Field(1000, ge=1)
    http_parser: Literal["auto", "httptools", "h11"] = "auto"
    max_header_bytes: int = Field(16 * 1024, ge=1024)

    generator_model: str = "gpt2"
    sentiment_model: str = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    model_source: Literal["auto", "local", "hub"] = "auto"
    generator_precision: Literal["fp32", "int8"] = "fp32"
    sentiment_precision: Literal["fp32", "int8"] = "fp32"
    generator_fp32_kernels: Literal["onednn", "torch"] = "onednn"
    sentiment_fp32_kernels: Literal["onednn", "torch"] = "onednn"
    models_cache_dir: Path = PROJECT_ROOT / "models_cache"
    torch_num_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    generator_scheduler: Literal["continuous", "static"] = "continuous"
    batch_max_size: int = Field(32, ge=1, le=1024)
    batch_max_wait_ms: float = Field(5.0, ge=0)
    batch_queue_limit: int = Field(1024, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    max_prompt_chars: int = Field(4000, ge=1)
    max_request_bytes: int = Field(1024 * 1024, ge=1)
    body_timeout_s: float = Field(30.0, gt=0)
    blocked_terms: str = ""

    redis_url: str | None = None
    redis_timeout_s: float = Field(0.25, gt=0)
    cache_ttl_s: float = Field(3600.0, gt=0)
    cache_max_items: int = Field(10000, ge=1)
    cache_lock_ttl_s: float = Field(30.0, gt=0)
    cache_allow_client_bypass: bool = False

    api_keys: str = ""
    admin_api_keys: str = ""
    api_keys_file: Path | None = Field(None, description=(
        "TOML file of API keys: [[keys]] entries with tenant, key (or sha256:<hex>), role (user|admin) and grants "
        "(paid providers the key may create batch jobs for), and [tenants.<name>] egress_rate_limit"))
    cache_scope: Literal["tenant", "global"] = Field("tenant", description=(
        "tenant: each tenant has its own cached answers (another tenant's identical prompt is computed again); "
        "global: tenants share answers, for deployments whose tenants trust each other"))
    webhook_allow_http: bool = Field(False, description=(
        "Accept http:// webhook URLs (job webhooks and ALERT_WEBHOOK_URL); by default only https://"))
    webhook_allowed_hosts: str = Field("", description=(
        "Comma-separated host names, addresses or networks (CIDR) that webhooks may reach although they are "
        "loopback, private, link-local or otherwise internal"))
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
    gemini_model: str = "gemini-2.5-flash-lite"
    gemini_timeout_s: float = Field(20.0, gt=0)
    gemini_cache_ttl_s: float = Field(300.0, gt=0)
    gemini_retry_backoff_s: float = Field(1.0, ge=0)
    analyze_max_wait_s: float = Field(2.0, ge=0)

    batch_worker: Literal["in-process", "off"] = "in-process"
    batch_schedule: str = "0 2 * * *"
    batch_timezone: str = "UTC"
    batch_poll_interval_s: float = Field(60.0, gt=0)
    batch_max_attempts: int = Field(3, ge=1)
    batch_lease_ttl_s: float = Field(120.0, gt=0)
    # Per call to a provider's batch API: past it the call counts as answerless (a create is then looked up).
    batch_provider_timeout_s: float = Field(60.0, gt=0)
    batch_background_max_size: int = Field(4, ge=1)
    # A local item claimed this long ago by a runner that is not computing it (it failed or was restarted) is
    # queued again.
    batch_local_requeue_s: float = Field(600.0, gt=0)
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
    record_buffer_max: int = Field(100_000, ge=1)
    record_spill_dir: Path = Field(default_factory=default_spill_dir)
    database_timeout_s: float = Field(5.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, gt=0)

    @field_validator("batch_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError("not a cron expression: expected five fields, e.g. '0 2 * * *' (02:00 every day)")
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

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("ingress_rate_limit", "ingress_rate_limit_generate", "ingress_rate_limit_predict",
                     "ingress_rate_limit_analyze")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            rate_policy.parse_policy("setting", value)
        except ValueError:
            raise ValueError(rate_policy.FORMS) from None
        return value

    @field_validator("egress_rate_limit")
    @classmethod
    def _egress_rate_limits(cls, value: str) -> str:
        rate_policy.parse_policies(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("expected sqlite+aiosqlite:///path/to/file.db or "
                             "postgresql+asyncpg://user:pass@host:5432/db")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://[:password@]host:6379/0, rediss://... (TLS) or unix:///path/to/socket")
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _hosts(cls, value: str) -> str:
        from server.core.destinations import parse_allowlist

        parse_allowlist(value)
        return value

    @model_validator(mode="after")
    def _alert_webhook(self) -> "Settings":
        from server.core.destinations import DestinationPolicy, RefusedDestination

        if self.alert_webhook_url is not None:
            try:
                DestinationPolicy.from_settings(self.webhook_allow_http, self.webhook_allowed_hosts).check(
                    self.alert_webhook_url)
            except RefusedDestination as exc:
                raise ValueError(f"invalid ALERT_WEBHOOK_URL: {exc}") from None
        return self

    @model_validator(mode="after")
    def _keys(self) -> "Settings":
        from server.core.tenants import KeyFileError, KeyRing

        try:
            KeyRing.from_settings(self.api_keys, self.admin_api_keys, self.api_keys_file)
        except KeyFileError as exc:
            raise ValueError(f"invalid API keys: {exc}") from None
        return self

    @field_validator("blocked_terms")
    @classmethod
    def _terms_file_exists(cls, value: str) -> str:
        if value.startswith("@") and not Path(value[1:]).is_file():
            raise ValueError(f"no file {value[1:]!r}: give comma-separated terms, or @path to a file of one term per "
                             "line")
        return value


def _accepted_forms(field: FieldInfo) -> str:
    """What a field accepts, from its type and bounds: the second half of an invalid setting's line."""
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "expected one of " + ", ".join(repr(choice) for choice in get_args(annotation))
    kinds = [kind for kind in get_args(annotation) or (annotation,) if kind is not type(None)]
    names = {int: "an integer", float: "a number", bool: "true or false", Path: "a path", str: "text"}
    bounds = [f"{symbol} {getattr(rule, name)}" for rule in field.metadata
              for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
              if getattr(rule, name, None) is not None]
    return f"expected {names.get(kinds[0], str(kinds[0])) if kinds else 'a value'} {' and '.join(bounds)}".rstrip()


def _redacted(value: object) -> str:
    """The value as typed, without the password of a URL (DATABASE_URL, REDIS_URL)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", repr(value))


def settings_errors(error: ValidationError) -> list[str]:
    """One line per invalid setting: the variable, the value given, and what it accepts."""
    lines: dict[str, str] = {}
    for problem in error.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        field = Settings.model_fields.get(name)
        if name in lines:
            continue
        if field is None:
            lines[name] = f"invalid settings: {problem['msg']}"
            continue
        own_rule = problem["type"] == "value_error"
        expected = str(problem["ctx"]["error"]) if own_rule else _accepted_forms(field)
        lines[name] = f"invalid setting {name.upper()}={_redacted(problem['input'])}: {expected}"
    return list(lines.values())


@lru_cache
def get_settings() -> Settings:
    """The settings of this process. An invalid environment ends it with exit status 2 and one line per invalid
    variable on stderr, no traceback: every entry point (`python -m server ...`, `uvicorn server.main:app`,
    Alembic) reads its settings here."""
    try:
        return Settings()
    except ValidationError as error:
        print("\n".join(settings_errors(error)), file=sys.stderr)
        raise SystemExit(2) from None

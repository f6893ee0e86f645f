"""Settings, read once from the environment (and `.env`) with pydantic-settings.

Every field maps to the upper-case environment variable of the same name; `.env.example` lists them all.
"""

import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.core import rate_policy

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_spill_dir() -> Path:
    """`$XDG_STATE_HOME/inference-server/spill` (XDG_STATE_HOME: ~/.local/state unless set to an absolute path)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    return (Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state") / "inference-server" / "spill"


def settings_conflict(role: str, device: str, dtype: str, precision: str, kernels: str) -> str | None:
    """The line refusing a contradiction visible in the settings alone (`role` is GENERATOR or SENTIMENT), or None.
    What depends on the machine (DEVICE=auto finding a GPU, or none there) is refused at load (server/ml/device.py)."""
    if device.startswith("cuda") and precision == "int8":
        return (
            f"{role}_PRECISION=int8 runs on the CPU only (dynamic quantization has no CUDA kernels): set "
            f"DEVICE=cpu or {role}_PRECISION=fp32"
        )
    if device.startswith("cuda") and kernels == "onednn":
        return (
            f"{role}_FP32_KERNELS=onednn is a CPU path (oneDNN packed weights): set DEVICE=cpu, or "
            f"{role}_FP32_KERNELS=auto on a GPU"
        )
    if device == "cpu" and dtype == "float16":
        return (
            f"{role}_DTYPE=float16 is refused on the CPU (slower than float32 there, and it changes outputs): "
            f"set {role}_DTYPE=auto or float32 (bfloat16 on a CPU with AVX512-BF16 or AMX), or DEVICE=cuda"
        )
    if dtype in ("float16", "bfloat16") and precision == "int8":
        return (
            f"{role}_PRECISION=int8 quantizes float32 weights: set {role}_DTYPE=auto or float32, or "
            f"{role}_PRECISION=fp32"
        )
    if dtype in ("float16", "bfloat16") and kernels == "onednn":
        return (
            f"{role}_FP32_KERNELS=onednn packs float32 weights: set {role}_FP32_KERNELS=auto (or torch) with "
            f"{role}_DTYPE={dtype}"
        )
    return None


def renamed(name: str, *former: str) -> AliasChoices:
    """A setting read under its name, else under the names it had before (which keep working; the name wins when
    both are set)."""
    return AliasChoices(name, *former)


def former_names(name: str) -> tuple[str, ...]:
    """The names a setting had before `renamed`, lower case."""
    alias = Settings.model_fields[name].validation_alias
    return tuple(str(choice) for choice in alias.choices[1:]) if isinstance(alias, AliasChoices) else ()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    app_name: str = Field("inference-server", description="Name shown by `/` and the docs")
    host: str = Field("127.0.0.1", description="Address `python -m server serve` listens on")
    port: int = Field(8000, ge=1, le=65535, description="Port `python -m server serve` listens on")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info",
        description=(
            "critical, error, warning, info, debug or trace (any case); libraries' INFO lines show only at debug"
        ),
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description=(
            "text (human) or json (one object per line: time, level, logger, message, request_id; method, route, "
            "status, duration_ms on access lines), for every line, uvicorn's included"
        ),
    )
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        description=(
            "Seconds an idle keep-alive connection stays open after a response (uvicorn timeout_keep_alive; `serve` "
            "only)"
        ),
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description=(
            "Once this many connections are open or requests running, a new request is answered 503 at once (uvicorn "
            "limit_concurrency; `serve` only)"
        ),
    )
    http_parser: Literal["auto", "httptools", "h11"] = Field(
        "auto",
        description=("uvicorn's HTTP/1.1 parser: auto (httptools when installed), httptools or h11 (`serve` only)"),
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description=(
            "With HTTP_PARSER=h11 only: request line + headers larger than this get 400 (httptools has no such limit)"
        ),
    )

    generator_model: str = Field(
        "gpt2", description=("Causal LM for /generate and /v1/completions: hub id or local directory")
    )
    sentiment_model: str = Field(
        "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        description=("Sequence classifier for /predict: hub id or local directory"),
    )
    model_source: Literal["auto", "local", "hub"] = Field(
        "auto",
        description=(
            "local: directories and the cache only, never the network; hub: download into the cache when missing, "
            "fail clearly when impossible; auto: cache, then hub, then random-weight offline stand-ins with a loud "
            "warning"
        ),
    )
    generator_precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description=(
            "fp32 (the model as trained) or int8 (Linear layers quantized at load; changes outputs; the model answers"
            " as `<name>:int8`)"
        ),
    )
    sentiment_precision: Literal["fp32", "int8"] = Field(
        "fp32", description=("fp32 or int8 for the classifier, as GENERATOR_PRECISION")
    )
    generator_fp32_kernels: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description=(
            "Who computes the generator's fp32 Linear layers on the CPU: onednn (weights packed at load: same "
            "precision, about 2x faster on AVX2 CPUs) or torch (its default GEMM, exactly as transformers runs it); "
            "auto: each Linear shape on whichever of the two was faster at every row count timed on this CPU (once, "
            "cached under MODELS_CACHE_DIR/kernels), torch on a GPU (onednn is refused there)"
        ),
    )
    sentiment_fp32_kernels: Literal["auto", "onednn", "torch"] = Field(
        "auto", description=("auto, onednn or torch for the classifier's fp32 Linear layers, as GENERATOR_FP32_KERNELS")
    )
    device: str = Field(
        "auto",
        description=(
            "Where both models run: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N (see "
            "docs/gpu.md)"
        ),
    )
    generator_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description=(
            "The generator's floating-point type: auto (bfloat16 on a GPU that computes it, else float16 on a GPU; "
            "float32 on the CPU); on the CPU float16 is refused, and bfloat16 is opt-in on CPUs with AVX512-BF16 or "
            "AMX only (refused elsewhere: slower than float32 there). Other than the CPU's float32, the model "
            "answers as `<name>:<device>:<dtype>`"
        ),
    )
    sentiment_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description=("The classifier's floating-point type, as GENERATOR_DTYPE")
    )
    models_cache_dir: Path = Field(PROJECT_ROOT / "models_cache", description="Hub cache and the offline/ stand-ins")
    torch_num_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description=("Intra-op threads of the one torch thread that runs both models (default: the machine's cores)"),
    )

    generator_scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description=(
            "continuous: rows join and leave the running batch at every decoding step and tokens stream as they come;"
            " static: the micro-batcher, one generate call per batch (kept for comparison)"
        ),
    )
    scheduler_max_size: int | None = Field(
        None,
        validation_alias=renamed("scheduler_max_size", "batch_max_size"),
        ge=1,
        le=1024,
        description=(
            "Most distinct items per model call (continuous: most rows in the running batch); unset: 32 on the CPU, "
            "on a GPU as many full-context rows as half its free memory holds, at most 256"
        ),
    )
    scheduler_max_wait_ms: float = Field(
        5.0,
        validation_alias=renamed("scheduler_max_wait_ms", "batch_max_wait_ms"),
        ge=0,
        description="Floor of the post-batch linger, in milliseconds",
    )
    scheduler_queue_limit: int = Field(
        1024,
        validation_alias=renamed("scheduler_queue_limit", "batch_queue_limit"),
        ge=1,
        description=("Items waiting per model before a request is refused (503 + Retry-After)"),
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "Per-request deadline (504); items not started are dropped, rows being generated stop at the next step"
        ),
    )
    max_prompt_chars: int = Field(4000, ge=1, description="Longest prompt or text")
    max_request_bytes: int = Field(
        1024 * 1024, ge=1, description=("Largest request body; larger is a 413, before parsing")
    )
    body_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next chunk of a request body; then 408")
    body_deadline_s: float = Field(
        60.0, gt=0, description=("Longest time to receive a whole request body, however it trickles in; then 408")
    )
    scheduler_loop_max_failures: int = Field(
        5,
        validation_alias=renamed("scheduler_loop_max_failures", "batch_loop_max_failures"),
        ge=1,
        description=(
            "A model loop that fails this many times within SCHEDULER_LOOP_FAILURE_WINDOW_S is not restarted: "
            "/health and /health/live answer 503"
        ),
    )
    scheduler_loop_failure_window_s: float = Field(
        60.0,
        validation_alias=renamed("scheduler_loop_failure_window_s", "batch_loop_failure_window_s"),
        gt=0,
        description="Window of SCHEDULER_LOOP_MAX_FAILURES",
    )
    scheduler_stall_s: float = Field(
        30.0,
        validation_alias=renamed("scheduler_stall_s", "batch_stall_s"),
        gt=0,
        description=("A model with work waiting and no forward pass for this long is stalled: /health answers 503"),
    )
    drain_s: float = Field(
        5.0,
        ge=0,
        description=(
            "After SIGTERM, /health answers 503 while requests are still served for this long (at least two "
            "health-check intervals of the load balancer), then the server stops accepting"
        ),
    )
    blocked_terms: str = Field(
        "",
        description=(
            "Prompts containing one of these terms get 400: comma-separated, or @path to a file of one term per line "
            "(# comments); matched case-insensitively on word boundaries after NFKC normalisation"
        ),
    )

    redis_url: str | None = Field(
        None,
        description=(
            "Unset: in-process cache and limits; set (redis://, rediss://, unix://): Redis shared by replicas for the"
            " cache, its stampede lock and the limits"
        ),
    )
    redis_timeout_s: float = Field(
        0.25,
        gt=0,
        description=(
            "Longest wait for Redis on the request path: each connect, read and write, and the wait for a pooled "
            "connection"
        ),
    )
    cache_ttl_s: float = Field(3600.0, gt=0, description="Lifetime of a cached answer")
    cache_max_items: int = Field(10000, ge=1, description="Bound of the in-memory cache (LRU)")
    cache_lock_ttl_s: float = Field(
        30.0, gt=0, description=("Stampede lock lifetime; waiters take over from a dead holder after it")
    )
    cache_allow_client_bypass: bool = Field(
        False, description=("Honour `Cache-Control: no-cache` (recompute and refresh)")
    )

    api_keys: str = Field(
        "",
        description=(
            "Comma-separated bearer keys, or sha256:<hex> digests of them; each key its own tenant, role user, no "
            "paid-provider grant. Empty (and no other keys): the server is open, as one tenant"
        ),
    )
    admin_api_keys: str = Field(
        "",
        description=(
            "Admin keys (same format): every tenant's data, and the admin operations (thresholds, cache removal, "
            "scheduler, alerts, batch health)"
        ),
    )
    api_keys_file: Path | None = Field(
        None,
        description=(
            "TOML file of API keys: [[keys]] entries with tenant, key (or sha256:<hex>), role (user|admin) and grants "
            "(paid providers the key may create batch jobs for), and [tenants.<name>] egress_rate_limit"
        ),
    )
    cache_scope: Literal["tenant", "global"] = Field(
        "tenant",
        description=(
            "tenant: each tenant has its own cached answers (another tenant's identical prompt is computed again); "
            "global: tenants share answers, for deployments whose tenants trust each other"
        ),
    )
    webhook_allow_http: bool = Field(
        False,
        description=("Accept http:// webhook URLs (job webhooks and ALERT_WEBHOOK_URL); by default only https://"),
    )
    webhook_allowed_hosts: str = Field(
        "",
        description=(
            "Comma-separated host names, addresses or networks (CIDR) that webhooks may reach although they are "
            "loopback, private, link-local or otherwise internal"
        ),
    )
    metrics_require_key: bool = Field(False, description="Put /metrics behind the keys too")
    forwarded_allow_ips: str = Field("127.0.0.1", description="Proxies trusted for X-Forwarded-For (uvicorn's setting)")
    ingress_rate_limit: str = Field(
        "120/minute", description=("Per client over all limited routes: N/second|minute|hour|day[;burst=B] or off")
    )
    ingress_rate_limit_generate: str = Field(
        "",
        description=(
            "Extra per-client limit on /generate and /v1/completions, on top of INGRESS_RATE_LIMIT (empty: none)"
        ),
    )
    ingress_rate_limit_predict: str = Field(
        "", description=("Extra per-client limit on /predict, on top of INGRESS_RATE_LIMIT (empty: none)")
    )
    ingress_rate_limit_analyze: str = Field(
        "", description=("Extra per-client limit on /analyze/performance, on top of INGRESS_RATE_LIMIT (empty: none)")
    )
    egress_rate_limit: str = Field(
        "gemini=10/minute,openai=60/minute,anthropic=50/minute",
        description=("Global quotas on paid API calls, per provider: name=N/period,..."),
    )
    rate_limit_fail_mode: Literal["open", "closed"] = Field(
        "open", description=("When Redis is down: open allows and counts, closed answers 503")
    )

    openai_api_key: str | None = Field(
        None,
        description=("OpenAI key for batch offload (unset: the provider is unconfigured and its jobs are refused)"),
    )
    openai_base_url: str | None = Field(
        None, description=("Another OpenAI endpoint (a proxy, or a test server); unset: the SDK's default")
    )
    anthropic_api_key: str | None = Field(None, description="Anthropic key for batch offload (unset: unconfigured)")
    anthropic_base_url: str | None = Field(None, description="Another Anthropic endpoint; unset: the SDK's default")
    gemini_api_key: str | None = Field(
        None,
        description=(
            "Gemini key for batch offload and the performance report (unset: unconfigured, rule-based reports)"
        ),
    )
    gemini_base_url: str | None = Field(None, description="Another Gemini endpoint; unset: the SDK's default")
    gemini_model: str = Field("gemini-2.5-flash-lite", description="The model that writes /analyze/performance reports")
    gemini_timeout_s: float = Field(20.0, gt=0, description="Timeout of one report call")
    gemini_cache_ttl_s: float = Field(300.0, gt=0, description="How long a report stays cached")
    gemini_retry_backoff_s: float = Field(
        1.0,
        ge=0,
        description=(
            "Report retry backoff base (waits of 1-2, 2-4, 4-8 times it, or Retry-After if longer; at most 4 attempts)"
        ),
    )
    analyze_max_wait_s: float = Field(
        2.0,
        ge=0,
        description=("Longest wait for the gemini egress quota or a Retry-After; beyond it the report falls back"),
    )

    batch_worker: Literal["in-process", "off"] = Field(
        "in-process",
        description=(
            "in-process: the web process runs the batch worker; off: another process does (`python -m server worker`)"
        ),
    )
    batch_schedule: str = Field("0 2 * * *", description="The window (cron, five fields) at which window jobs run")
    batch_timezone: str = Field("UTC", description="IANA time zone of BATCH_SCHEDULE")
    batch_poll_interval_s: float = Field(
        60.0, gt=0, description=("How often the worker ticks and polls each provider batch")
    )
    batch_max_attempts: int = Field(
        3, ge=1, description=("Tries of an item (errored or expired items go into a later batch)")
    )
    batch_lease_ttl_s: float = Field(
        120.0, gt=0, description=("The worker lease's lifetime; another process takes over after it")
    )
    batch_provider_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "Per call to a provider's batch API: past it the call counts as answerless (a create is then looked up "
            "before any retry)"
        ),
    )
    batch_provider_max_backoff_s: float = Field(
        30.0,
        gt=0,
        description=(
            "Longest wait between two tries of a provider call; a create refused with a longer Retry-After is left to "
            "a later tick"
        ),
    )
    batch_background_max_size: int = Field(
        4,
        ge=1,
        description=("Largest background batch of local items (an interactive request waits behind at most one)"),
    )
    batch_local_requeue_s: float = Field(
        600.0,
        gt=0,
        description=(
            "A local item claimed this long ago by a runner that is not computing it (it failed or was restarted) is "
            "queued again"
        ),
    )
    batch_prices_file: Path | None = Field(
        None, description=("JSON overriding or extending the shipped prices (server/services/offload/prices.json)")
    )
    batch_local_reference_price: str = Field(
        "openai:gpt-4o-mini",
        description=("Whose real-time price local work's savings are measured against (provider:model)"),
    )
    batch_webhook_secret: str | None = Field(None, description="Key of the X-Signature HMAC on job and alert webhooks")
    alert_webhook_url: str | None = Field(
        None,
        description=(
            "Where alerts are posted when they start (https, public address, unless WEBHOOK_ALLOW_HTTP / "
            "WEBHOOK_ALLOWED_HOSTS)"
        ),
    )
    batch_alert_failure_rate: float = Field(0.10, ge=0, le=1, description="Alert when a job's failed share passes this")
    batch_alert_max_age_h: float = Field(48.0, gt=0, description="Alert when queued work is older than this many hours")
    batch_alert_queued_items: int = Field(10_000, ge=0, description="Alert when more items than this are queued")
    batch_alert_savings_step_usd: float = Field(
        1000.0, gt=0, description=("Alert (good news) each time the savings pass another step of this many dollars")
    )
    batch_openai_max_requests: int = Field(
        50_000, ge=1, description=("Most requests per OpenAI batch (larger jobs are split)")
    )
    batch_openai_max_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description=("Largest OpenAI batch input file, in bytes")
    )
    batch_anthropic_max_requests: int = Field(100_000, ge=1, description="Most requests per Anthropic batch")
    batch_anthropic_max_bytes: int = Field(256 * 1024 * 1024, ge=1, description="Largest Anthropic batch, in bytes")
    batch_gemini_max_requests: int = Field(100_000, ge=1, description="Most requests per Gemini batch")
    batch_gemini_max_bytes: int = Field(
        2 * 1024 * 1024 * 1024, ge=1, description=("Largest Gemini batch input file, in bytes")
    )

    files_dir: Path = Field(
        PROJECT_ROOT / "data" / "files",
        description=(
            "Where the files of /v1/files (batch inputs and outputs) are kept, one file per id; their metadata is in "
            "the database"
        ),
    )
    max_batch_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description=("Largest upload to POST /v1/files; larger is a 413 while it streams in")
    )
    files_retention_days: float = Field(
        30.0,
        gt=0,
        description=("Files of /v1/files (uploads and batch outputs) are deleted this many days after their creation"),
    )
    batch_model_routes: str = Field(
        "gpt-*=openai,o1-*=openai,o3-*=openai,o4-*=openai,text-embedding-*=openai,claude-*=anthropic,gemini-*=gemini",
        description=(
            "Which paid provider runs a /v1/batches line's model: comma-separated `pattern=provider` (a trailing `*` "
            "matches by prefix); `provider/model` in a line always names its provider; the served model runs locally"
        ),
    )

    database_url: str = Field(
        f"sqlite+aiosqlite:///{PROJECT_ROOT / 'data' / 'server.db'}",
        description=("sqlite+aiosqlite:///path/to/file.db or postgresql+asyncpg://user:pass@host:5432/db"),
    )
    record_flush_interval_ms: float = Field(
        200.0,
        gt=0,
        description=("How often buffered records are written, in milliseconds (also the most a SIGKILL can lose)"),
    )
    record_flush_max_items: int = Field(500, ge=1, description="Most records per write")
    record_buffer_max: int = Field(
        100_000,
        ge=1,
        description=("Most records buffered in memory; past it, new rows go to a spill file (never dropped)"),
    )
    record_spill_dir: Path = Field(
        default_factory=default_spill_dir,
        description=(
            "Spill files (JSON lines): rows not written at shutdown or past RECORD_BUFFER_MAX, and rows the database "
            "rejected (default: $XDG_STATE_HOME/inference-server/spill)"
        ),
    )
    database_timeout_s: float = Field(
        5.0, gt=0, description=("Bound on every database connect and statement, and on each record write transaction")
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "Bound on finishing open requests and then on writing buffered records at shutdown; what is still pending"
            " is spilled"
        ),
    )

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

    @field_validator(
        "ingress_rate_limit", "ingress_rate_limit_generate", "ingress_rate_limit_predict", "ingress_rate_limit_analyze"
    )
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
            raise ValueError(
                "expected sqlite+aiosqlite:///path/to/file.db or postgresql+asyncpg://user:pass@host:5432/db"
            )
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
                    self.alert_webhook_url
                )
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

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _placement(self) -> "Settings":
        """Contradictions between the device and the per-model settings that the settings alone show (those that
        depend on the machine are refused when the models load: server/ml/device.py)."""
        for role in ("generator", "sentiment"):
            problem = settings_conflict(
                role.upper(),
                self.device,
                getattr(self, f"{role}_dtype"),
                getattr(self, f"{role}_precision"),
                getattr(self, f"{role}_fp32_kernels"),
            )
            if problem:
                raise ValueError(problem)
        return self

    @field_validator("blocked_terms")
    @classmethod
    def _terms_file_exists(cls, value: str) -> str:
        if value.startswith("@") and not Path(value[1:]).is_file():
            raise ValueError(
                f"no file {value[1:]!r}: give comma-separated terms, or @path to a file of one term per line"
            )
        return value


def _accepted_forms(field: FieldInfo) -> str:
    """What a field accepts, from its type and bounds: the second half of an invalid setting's line."""
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "expected one of " + ", ".join(repr(choice) for choice in get_args(annotation))
    kinds = [kind for kind in get_args(annotation) or (annotation,) if kind is not type(None)]
    names = {int: "an integer", float: "a number", bool: "true or false", Path: "a path", str: "text"}
    bounds = [
        f"{symbol} {getattr(rule, name)}"
        for rule in field.metadata
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(rule, name, None) is not None
    ]
    return f"expected {names.get(kinds[0], str(kinds[0])) if kinds else 'a value'} {' and '.join(bounds)}".rstrip()


def _redacted(value: object) -> str:
    """The value as typed, without the password of a URL (DATABASE_URL, REDIS_URL)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", repr(value))


def _as_given(name: str) -> str:
    """The variable the value came from: a former name when only it is in the environment."""
    if name.upper() not in os.environ:
        for former in former_names(name):
            if former.upper() in os.environ:
                return former.upper()
    return name.upper()


def settings_errors(error: ValidationError) -> list[str]:
    """One line per invalid setting: the variable, the value given, and what it accepts."""
    lines: dict[str, str] = {}
    for problem in error.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        field = Settings.model_fields.get(name)
        if name in lines:
            continue
        own_rule = problem["type"] == "value_error"
        if field is None:
            lines[name] = f"invalid settings: {problem['ctx']['error'] if own_rule else problem['msg']}"
            continue
        expected = str(problem["ctx"]["error"]) if own_rule else _accepted_forms(field)
        lines[name] = f"invalid setting {_as_given(name)}={_redacted(problem['input'])}: {expected}"
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

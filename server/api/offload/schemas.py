"""Request and response bodies of the batch offload API (`/batch/...`; see docs/batch-offload.md)."""

import math
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from server.api.schemas import UtcDatetime
from server.core.provider_names import Provider
from server.core.request_types import REQUEST_CONFIG, Text, storable


def _storable_json(value):
    """Free-form JSON of a request (bodies, metadata): every string storable, every number finite."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    if isinstance(value, dict):
        return {storable(key): _storable_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable_json(item) for item in value]
    return value


JSONObject = Annotated[dict, AfterValidator(_storable_json)]

Kind = Literal["chat", "embedding", "generate", "predict"]
JobStatus = Literal[
    "queued", "submitted", "in_progress", "completed", "partially_completed", "failed", "cancelled", "expired"
]
ItemStatus = Literal["queued", "submitted", "succeeded", "failed", "cancelled", "expired"]
Name = Annotated[Text, Field(min_length=1, max_length=200)]
Priority = Annotated[StrictInt, Field(ge=1, le=10, description="Higher runs first")]
Schedule = Literal["window", "now"]


class RequestIn(BaseModel):
    model_config = REQUEST_CONFIG

    custom_id: Annotated[Text, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Unique in its job")]
    body: JSONObject = Field(
        description="`messages` (chat), `input` (embedding), `prompt` (generate) or `text` "
        "(predict), plus options such as `max_tokens` and `temperature`"
    )


class JobCreate(BaseModel):
    model_config = REQUEST_CONFIG | ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "nightly scoring",
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "kind": "chat",
                    "job_type": "creative_scoring",
                    "requests": [
                        {
                            "custom_id": "ad-1",
                            "body": {"messages": [{"role": "user", "content": "Score this ad: ..."}], "max_tokens": 50},
                        }
                    ],
                }
            ]
        }
    )

    name: Name
    description: Annotated[Text, Field(max_length=2000)] = ""
    provider: Provider
    model: Name
    kind: Kind
    job_type: Annotated[Text, Field(min_length=1, max_length=100)] = "default"
    priority: Priority = 5
    schedule: Schedule = Field("window", description="`window`: the next scheduled run (BATCH_SCHEDULE); `now`")
    webhook_url: (
        Annotated[
            Text,
            Field(
                max_length=2000,
                description=(
                    "Called (POST, signed) when the job finishes: https, to a public address (see WEBHOOK_ALLOW_HTTP, "
                    "WEBHOOK_ALLOWED_HOSTS); refused with 422 otherwise. Answers show only its scheme and host"
                ),
            ),
        ]
        | None
    ) = None
    metadata: JSONObject = {}
    requests: list[RequestIn] = Field([], max_length=100_000)


class JobPatch(BaseModel):
    model_config = REQUEST_CONFIG

    name: Name | None = None
    description: Annotated[Text, Field(max_length=2000)] | None = None
    priority: Priority | None = None
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def something(self) -> "JobPatch":
        if not self.model_fields_set:
            raise ValueError("give at least one of name, description, priority, schedule")
        return self


class RequestsIn(BaseModel):
    model_config = REQUEST_CONFIG

    requests: list[RequestIn] = Field(min_length=1, max_length=100_000)


class AddedOut(BaseModel):
    added: int = Field(description="New requests stored")
    unchanged: int = Field(description="custom_ids already present with the same body (a no-op)")


class CountsOut(BaseModel):
    total: int
    succeeded: int
    failed: int
    pending: int


class UsageOut(BaseModel):
    input_tokens: int
    output_tokens: int


class JobOut(BaseModel):
    id: str
    tenant: str = Field(description="The tenant whose job it is")
    name: str
    description: str
    provider: Provider
    model: str
    kind: Kind
    job_type: str
    priority: int
    schedule: Schedule
    webhook_url: str | None = Field(description="Scheme and host of the webhook (its path and query may hold a token)")
    metadata: dict
    status: JobStatus
    counts: CountsOut
    usage: UsageOut
    cost_usd: float | None = Field(description="At the batch price; null when the model's price is unknown")
    realtime_cost_usd: float | None = Field(description="The same usage at the real-time price")
    savings_usd: float | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    submitted_at: UtcDatetime | None
    completed_at: UtcDatetime | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class ItemOut(BaseModel):
    id: str
    job_id: str
    custom_id: str
    status: ItemStatus
    attempts: int
    body: dict
    output: dict | None = Field(description="`text`, `embedding`, or `label` and `score`, once succeeded")
    error: str | None
    usage: UsageOut | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    completed_at: UtcDatetime | None


class ItemPage(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None


class ResponseOut(BaseModel):
    custom_id: str
    status: ItemStatus
    output: dict | None
    raw: dict | None = Field(description="The provider's own response body")
    usage: UsageOut | None
    error: str | None
    completed_at: UtcDatetime | None


class ResponsePage(BaseModel):
    items: list[ResponseOut]
    next_cursor: str | None


class ProcessIn(BaseModel):
    model_config = REQUEST_CONFIG

    provider: Provider | None = None
    job_type: Annotated[Text, Field(min_length=1, max_length=100)] | None = None
    max_jobs: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = None


class ProcessOut(BaseModel):
    job_ids: list[str] = Field(description="Queued jobs now due: the worker submits them at its next tick")


class QueueIn(BaseModel):
    model_config = REQUEST_CONFIG | ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_type": "nightly_summaries",
                    "provider": "local",
                    "model": "gpt2",
                    "kind": "generate",
                    "data": {"prompt": "Summarise: ...", "max_tokens": 40},
                }
            ]
        }
    )

    job_type: Annotated[Text, Field(min_length=1, max_length=100)]
    provider: Provider
    model: Name
    kind: Kind
    data: JSONObject = Field(description="The request body (as `body` in POST /batch/jobs)")
    priority: Priority = 5


class QueueBulkIn(BaseModel):
    model_config = REQUEST_CONFIG

    items: list[QueueIn] = Field(min_length=1, max_length=10_000)


class QueuedOut(BaseModel):
    item_id: str
    job_id: str


class QueueStatusOut(BaseModel):
    waiting: int
    by_job_type: dict[str, int]
    by_provider: dict[str, int]
    by_priority: dict[str, int]


class SchedulerIn(BaseModel):
    model_config = REQUEST_CONFIG

    running: bool


class SchedulerOut(BaseModel):
    running: bool = Field(description="Whether this process runs the worker loop")
    mode: Literal["in-process", "off"]
    schedule: str
    timezone: str
    next_window: datetime
    poll_interval_s: float


class AlertOut(BaseModel):
    type: str
    severity: Literal["info", "warning"]
    message: str
    since: UtcDatetime | None = Field(description="When it started (null until the worker has recorded it)")


class BatchHealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    tasks: dict[str, dict] = Field(
        description="Per background loop of this process (batch-worker, "
        "batch-local-runner): its state, failures and last error"
    )
    scheduler: SchedulerOut
    leader: dict | None = Field(description="The process holding the worker lease (owner, expires_at), if any")
    last_run_at: UtcDatetime | None = Field(description="This process's last worker tick")
    last_run: dict | None
    providers: dict[str, str] = Field(description="`ok`, `unconfigured` (no API key) or `unreachable: <why>`")

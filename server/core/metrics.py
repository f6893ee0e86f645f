"""Prometheus metrics shared by every layer (served by GET /metrics from the default registry)."""

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)

MODEL_BATCHES = Counter(
    "model_batches",
    "Batches run by a model; param_sets counts distinct parameter sets among the batch's "
    "items (always 1: items with different parameters never share a call)",
    ["model", "param_sets"],
)
MODEL_ITEMS = Counter("model_items", "Items actually computed by a model (after in-batch deduplication)", ["model"])
MODEL_BATCH_SIZE = Histogram("model_batch_size", "Items computed per model call", ["model"], buckets=BATCH_SIZE_BUCKETS)
MODEL_BATCH_SECONDS = Histogram("model_batch_seconds", "Wall time of one model call", ["model"])
MODEL_ITEM_FAILURES = Counter("model_item_failures", "Items whose computation raised", ["model"])
SCHEDULER_QUEUE_WAIT = Histogram(
    "scheduler_queue_wait_seconds",
    "Time an item waited in the batcher's queue before its batch started",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SCHEDULER_QUEUE_DEPTH = Gauge("scheduler_queue_depth", "Items waiting for a batch", ["model"])
SCHEDULER_DROPPED = Counter("scheduler_dropped_items", "Items dropped before computation", ["model", "reason"])
SCHEDULER_REJECTED = Counter("scheduler_rejected_items", "Items refused because the queue was full", ["model"])
SCHEDULER_ABORTED = Counter(
    "scheduler_aborted_items",
    "Items stopped mid-computation because every caller was gone (reason: deadline, cancelled)",
    ["model", "reason"],
)
SCHEDULER_BACKGROUND_WAITED = Histogram(
    "scheduler_background_batches_waited",
    "Background batches an interactive item waited behind (by design at most 1)",
    ["model"],
    buckets=(0, 1, 2, 4, 8),
)
SCHEDULER_BACKGROUND_ITEMS = Counter(
    "scheduler_background_items", "Items computed in background batches (batch offload, local provider)", ["model"]
)
GENERATOR_FORWARDS = Counter(
    "generator_forward_passes",
    "Forward passes of the continuous decoding loop (kind: prefill of joining rows, decode step of the running batch)",
    ["model", "kind"],
)
GENERATOR_RUNNING = Gauge("generator_running_rows", "Rows in the continuous decoding loop's running batch", ["model"])
SCHEDULER_ABORT_STEPS = Histogram(
    "scheduler_abort_steps",
    "Decoding steps between a row losing its last caller and leaving the running batch",
    ["model"],
    buckets=(0, 1, 2, 4, 8, 16),
)
POLICY_REJECTIONS = Counter(
    "policy_rejections", "Requests refused because a prompt contains a blocked term", ["endpoint"]
)

HTTP_REQUESTS = Counter("http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

RECORDS_WRITTEN = Counter("records_written", "Rows written to the database", ["table"])
RECORD_WRITE_FAILURES = Counter(
    "record_write_failures",
    "Record writes that failed: attempts that kept their rows buffered (reason: timeout, "
    "unavailable, error) and rows the database refused, set aside in a rejected spill file (reason: rejected)",
    ["reason"],
)
RECORDS_PENDING = Gauge("records_pending", "Rows waiting in memory to be written")
RECORDS_SPILLED = Counter(
    "records_spilled",
    "Rows written to a spill file instead of the database (reason: overflow, shutdown, rejected)",
    ["reason"],
)

CACHE_REQUESTS = Counter(
    "cache_requests", "Cache outcomes per item: hit, miss, coalesced, bypass, error", ["endpoint", "result"]
)
CACHE_STORE_ERRORS = Counter(
    "cache_store_errors", "Failed cache store operations (the item is computed anyway)", ["backend", "operation"]
)

RATE_LIMIT_DECISIONS = Counter("rate_limit_decisions", "Rate-limit decisions", ["layer", "policy", "decision"])
RATE_LIMIT_ERRORS = Counter("rate_limit_errors", "Rate-limit checks that failed (store unavailable)", ["layer"])

CIRCUIT_STATE = Gauge(
    "circuit_state",
    "Circuit breaker of a dependency: 0 closed, 1 open (skipped), 2 half_open (one probe in flight)",
    ["dependency"],
)
CIRCUIT_FAILURES = Counter(
    "circuit_failures", "Calls to a dependency that failed (timeout, connection error)", ["dependency"]
)
CIRCUIT_SKIPPED = Counter("circuit_skipped", "Calls not sent because the dependency's circuit was open", ["dependency"])

BATCH_JOBS = Counter("batch_jobs", "Batch jobs that reached a final status", ["provider", "status"])
BATCH_ITEMS = Counter("batch_items", "Batch items that reached a final status", ["provider", "status"])
BATCH_PROVIDER_CALLS = Counter(
    "batch_provider_calls",
    "Calls to a batch provider (outcome: ok, quota, http_<status>)",
    ["provider", "operation", "outcome"],
)
BATCH_QUEUE_ITEMS = Gauge("batch_queue_items", "Batch items waiting to be submitted")
BATCH_SAVINGS = Counter(
    "batch_savings_usd", "Savings booked by finished batch jobs (vs the real-time price)", ["provider"]
)
BATCH_POLL_SECONDS = Histogram("batch_poll_seconds", "Time to poll one provider batch", ["provider"])
BATCH_ALERTS_ACTIVE = Gauge("batch_alerts_active", "Batch alerts currently active (1) or not (0)", ["type"])

ANALYZE_REPORTS = Counter(
    "analyze_reports",
    "Performance reports answered (source: gemini, fallback; reason: why a "
    "fallback: no_key, quota, timeout, unavailable, invalid_answer, error; none for gemini)",
    ["source", "reason"],
)
GEMINI_CALLS = Counter(
    "gemini_calls",
    "Calls to Gemini for performance reports (outcome: ok, quota, timeout, invalid_answer, error, http_<status>)",
    ["outcome"],
)

BACKGROUND_TASK_FAILURES = Counter(
    "background_task_failures",
    "Unexpected errors that ended a supervised background loop (it is restarted after a "
    "backoff, or given up: see /health)",
    ["task"],
)

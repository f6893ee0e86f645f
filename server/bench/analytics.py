"""`python -m server bench-analytics`: aggregation speed over a month of records.

Fills an empty database with `--records` request records spread over `--days` days (two endpoints, 2% failed,
log-normal latencies), through the record writer's own write (`store.BatchWrite`: records inserted and rolled up in
one transaction per chunk), then times `POST /metrics/aggregated` for the whole window by hour: the real route and
its serialisation over an in-process ASGI transport (no HTTP socket, no middleware). Prints one JSON object.
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select

from server.api.analytics import routes as analytics
from server.core.tenants import KeyRing
from server.db import migrate
from server.db.analytics_models import MetricRollup, RequestRecord
from server.db.session import create_engine, session_factory
from server.services.analytics.report import PerformanceReports
from server.services.analytics.service import Analytics
from server.services.limits.egress import EgressGuard
from server.services.limits.gcra import MemoryLimiter
from server.services.limits.ingress import IngressLimits
from server.services.records.store import BatchWrite, Record

CHUNK = 5000
MODELS = {"generate": "gpt2", "predict": "distilbert-sst2"}


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--records", type=int, default=1_000_000)
    command.add_argument("--days", type=int, default=30)
    command.add_argument("--repeat", type=int, default=20, help="timed queries")
    command.add_argument(
        "--database-url",
        help="an EMPTY database (default: a new SQLite file in a temporary "
        "directory); PostgreSQL: postgresql+asyncpg://...",
    )
    command.add_argument("--seed", type=int, default=0)


def _records(count: int, start: datetime, days: int, rng: random.Random):
    span_s = days * 86400
    for _ in range(count):
        endpoint = "generate" if rng.random() < 0.5 else "predict"
        failed = rng.random() < 0.02
        items = 0 if failed else rng.randint(1, 4)
        yield {
            "id": uuid.uuid4().hex,
            "endpoint": endpoint,
            "model": MODELS[endpoint],
            "status": 504 if failed else 200,
            "error": "DeadlineExceeded" if failed else None,
            "items": items,
            "cached_items": sum(rng.random() < 0.3 for _ in range(items)),
            "tokens_in": 8 * items,
            "tokens_out": 20 * items if endpoint == "generate" else 0,
            "latency_ms": rng.lognormvariate(4.5, 0.8),
            "created_at": start + timedelta(seconds=rng.random() * span_s),
        }


async def fill(sessions, count: int, start: datetime, days: int, seed: int) -> float:
    """Write `count` records through the writer's BatchWrite; seconds taken."""
    rng = random.Random(seed)
    began = time.perf_counter()
    chunk: list[Record] = []
    for row in _records(count, start, days, rng):
        chunk.append(Record(RequestRecord.__table__, row))
        if len(chunk) == CHUNK:
            await BatchWrite(chunk, CHUNK).run(sessions, 120.0)
            chunk = []
    if chunk:
        await BatchWrite(chunk, CHUNK).run(sessions, 120.0)
    return time.perf_counter() - began


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"
        await asyncio.to_thread(migrate.upgrade, url)
        engine = create_engine(url, timeout_s=120.0)
        sessions = session_factory(engine)
        try:
            end = datetime.now(UTC).replace(second=0, microsecond=0)
            start = end - timedelta(days=args.days)
            fill_s = await fill(sessions, args.records, start, args.days, args.seed)
            async with sessions() as session:
                rollups = await session.scalar(select(func.count()).select_from(MetricRollup))
            app = FastAPI()
            app.include_router(analytics.router)
            limiter = MemoryLimiter()
            # Only the reports' queue depths are read (none: no model runs here).
            reports = cast(PerformanceReports, SimpleNamespace(queue_depths=dict))
            ingress, egress = IngressLimits(limiter, None, {}, fail_open=True), EgressGuard(limiter, {}, fail_open=True)
            # No keys (one open tenant, which sees every row) and no limits: the live figures list none.
            app.state.runtime = SimpleNamespace(
                keys=KeyRing(), analytics=Analytics(sessions, reports, {}, ingress, egress)
            )
            body = {"start": start.isoformat(), "end": end.isoformat(), "bucket": "hour"}
            timings = []
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
                for _ in range(args.repeat + 1):  # the first warms the connection pool and caches
                    began = time.perf_counter()
                    answer = await client.post("/metrics/aggregated", json=body)
                    timings.append((time.perf_counter() - began) * 1000)
                    answer.raise_for_status()
            result = answer.json()
        finally:
            await engine.dispose()
    measured = timings[1:]
    return {
        "database": engine.url.get_backend_name(),
        "records": args.records,
        "days": args.days,
        "rollup_rows": rollups,
        "fill_s": round(fill_s, 1),
        "buckets": len(result["buckets"]),
        "total_requests": result["total"]["requests"],
        "aggregated_ms": {
            "p50": round(statistics.median(measured), 1),
            "max": round(max(measured), 1),
            "min": round(min(measured), 1),
        },
    }


def main(args: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(run(args)), indent=2))

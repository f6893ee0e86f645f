"""Migrations on data, on SQLite and PostgreSQL: rows written before tenants existed end up under `default`."""

import asyncio
from datetime import UTC, datetime

from alembic import command
from sqlalchemy import text

from server.db import migrate
from server.db.session import create_engine

COUNTERS = (
    "requests",
    "items",
    "errors",
    "cached_items",
    "tokens_in",
    "tokens_out",
    *(f"h{index:02d}" for index in range(20)),
)


async def test_rows_from_before_tenants_belong_to_the_default_tenant_and_rollups_survive(database_url):
    await _upgrade(database_url, "0004")
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO generations (id, prompt, generated_text, completion, model, params, finish_reason, "
                "prompt_tokens, completion_tokens, latency_ms, cached, created_at) VALUES ('g1', 'p', 'pc', 'c', 'm', "
                "'{}', 'length', 1, 1, 1.0, false, :now)"
            ),
            {"now": now},
        )
        await connection.execute(
            text(
                "INSERT INTO requests (id, endpoint, model, status, items, cached_items, tokens_in, tokens_out, "
                "latency_ms, created_at) VALUES ('r1', 'generate', 'm', 200, 1, 0, 1, 1, 1.0, :now)"
            ),
            {"now": now},
        )
        await connection.execute(
            text(
                f"INSERT INTO metric_rollups (minute, endpoint, model, {', '.join(COUNTERS)}, latency_sum_ms, "
                f"latency_max_ms) VALUES (100, 'generate', 'm', {', '.join(['3'] * len(COUNTERS))}, 9.0, 5.0)"
            )
        )
    await _upgrade(database_url, "0005")
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT tenant FROM generations"))).scalars().all() == ["default"]
        assert (await connection.execute(text("SELECT tenant FROM requests"))).scalars().all() == ["default"]
        rollup = (
            await connection.execute(text("SELECT tenant, minute, requests, latency_sum_ms FROM metric_rollups"))
        ).all()
        assert [tuple(row) for row in rollup] == [("default", 100, 3, 9.0)]
    async with engine.begin() as connection:
        await connection.execute(
            text(
                f"INSERT INTO metric_rollups (tenant, minute, endpoint, model, {', '.join(COUNTERS)}, latency_sum_ms, "
                f"latency_max_ms) VALUES ('shop', 100, 'generate', 'm', {', '.join(['2'] * len(COUNTERS))}, 4.0, 7.0)"
            )
        )
    await _downgrade(database_url, "0004")
    async with engine.connect() as connection:
        merged = (
            await connection.execute(
                text("SELECT minute, requests, latency_sum_ms, latency_max_ms FROM metric_rollups")
            )
        ).all()
    assert [tuple(row) for row in merged] == [(100, 5, 13.0, 7.0)], "downgrading adds the tenants' rows up"
    await engine.dispose()


async def _upgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(migrate.upgrade, url, revision)


async def _downgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, migrate.alembic_config(url), revision)

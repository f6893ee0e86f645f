"""Alembic environment: async engines, URL from the caller's config or else from the settings.

Migrations run under a lock, so that any number of processes starting together on a fresh database (replicas,
`uvicorn --workers N`) migrate it once: one migrates, the others wait, then find it at the latest revision.
PostgreSQL: an advisory lock; SQLite: a file lock beside the database file.
"""

import asyncio
import logging
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import Script
from filelock import FileLock
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from server.core.config import get_settings
from server.db.models import Base
from server.db.session import create_engine, ensure_sqlite_directory

# Any fixed bigint: the advisory lock id that every process of this application agrees on.
MIGRATION_LOCK_ID = 7_310_518_274_091_260_161

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
log = logging.getLogger("server.db.migrate")


def _announce(ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]) -> None:
    # Alembic types up_revision as a Revision; the ones it loads from versions/ are Scripts, which carry the doc.
    up = step.up_revision
    log.info("database migrated to %s (%s)", step.up_revision_id, up.doc if isinstance(up, Script) else "")


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        on_version_apply=_announce,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # The transaction-scoped variant, taken first in the one transaction Alembic runs every PostgreSQL
            # migration in: the commit that publishes the new schema (or the rollback of a failed run) releases
            # it, so a waiter reads the version table only once the schema is complete, and no unlock can be
            # missed on an error path (a session lock would stay held by a pooled connection).
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


def _sqlite_file_lock(database_url: str) -> AbstractContextManager:
    """SQLite has no advisory locks, and its own locking makes a concurrent `CREATE TABLE` fail rather than wait."""
    parsed = make_url(database_url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return nullcontext()
    ensure_sqlite_directory(database_url)
    return FileLock(f"{parsed.database}.migrate.lock")


async def _run_online() -> None:
    engine = create_engine(url)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with _sqlite_file_lock(url):
        asyncio.run(_run_online())

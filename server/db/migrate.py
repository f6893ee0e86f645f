"""Alembic upgrade, callable from code (the server runs it at start) and from `python -m server db upgrade`."""

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking (Alembic runs its own event loop): call it from a thread when a loop is running. Any number of
    processes may call it at once on one database: migrations run under a lock (`migrations/env.py`), so one
    migrates and the others wait, then find the database at the latest revision."""
    command.upgrade(alembic_config(url), revision)

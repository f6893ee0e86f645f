"""serving analytics: request records, per-minute rollups, thresholds and their audit

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Frozen here: a migration must not change when the model's histogram does.
HISTOGRAM_COLUMNS = tuple(f"h{index:02d}" for index in range(20))


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False, unique=True),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("cached_items", sa.Integer(), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    counters = ("requests", "items", "errors", "cached_items", "tokens_in", "tokens_out", *HISTOGRAM_COLUMNS)
    op.create_table(
        "metric_rollups",
        sa.Column("minute", sa.Integer(), primary_key=True),
        sa.Column("endpoint", sa.String(16), primary_key=True),
        sa.Column("model", sa.String(255), primary_key=True),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in counters),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("latency_max_ms", sa.Float(), nullable=False),
    )
    op.create_table(
        "analytics_thresholds",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=True),
    )
    op.create_table(
        "analytics_threshold_audit",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("analytics_threshold_audit", "analytics_thresholds", "metric_rollups", "requests"):
        op.drop_table(table)

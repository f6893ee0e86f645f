"""tenants: every stored row carries the tenant of the API key that made it; existing rows go to `default`

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Frozen here, as in 0004: a migration must not change when the models do.
HISTOGRAM_COLUMNS = tuple(f"h{index:02d}" for index in range(20))
COUNTERS = ("requests", "items", "errors", "cached_items", "tokens_in", "tokens_out", *HISTOGRAM_COLUMNS)
TABLES = (
    "generations",
    "predictions",
    "requests",
    "batch_jobs",
    "batch_items",
    "provider_batches",
    "analytics_threshold_audit",
)


def _tenant() -> sa.Column:
    return sa.Column("tenant", sa.String(64), nullable=False, server_default="default")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(_tenant())
            batch.create_index(f"ix_{table}_tenant", ["tenant"])
    # The rollups' key gains the tenant: a new table, filled from the old one (all under `default`), then renamed.
    op.create_table(
        "metric_rollups_by_tenant",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("minute", sa.Integer(), primary_key=True),
        sa.Column("endpoint", sa.String(16), primary_key=True),
        sa.Column("model", sa.String(255), primary_key=True),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in COUNTERS),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("latency_max_ms", sa.Float(), nullable=False),
    )
    columns = ", ".join(("minute", "endpoint", "model", *COUNTERS, "latency_sum_ms", "latency_max_ms"))
    op.execute(
        f"INSERT INTO metric_rollups_by_tenant (tenant, {columns}) SELECT 'default', {columns} FROM metric_rollups"
    )
    op.drop_table("metric_rollups")
    op.rename_table("metric_rollups_by_tenant", "metric_rollups")


def downgrade() -> None:
    op.create_table(
        "metric_rollups_merged",
        sa.Column("minute", sa.Integer(), primary_key=True),
        sa.Column("endpoint", sa.String(16), primary_key=True),
        sa.Column("model", sa.String(255), primary_key=True),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in COUNTERS),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("latency_max_ms", sa.Float(), nullable=False),
    )
    sums = ", ".join(f"SUM({name})" for name in (*COUNTERS, "latency_sum_ms"))
    op.execute(
        f"INSERT INTO metric_rollups_merged (minute, endpoint, model, {', '.join(COUNTERS)}, latency_sum_ms, "
        f"latency_max_ms) SELECT minute, endpoint, model, {sums}, MAX(latency_max_ms) FROM metric_rollups "
        "GROUP BY minute, endpoint, model"
    )
    op.drop_table("metric_rollups")
    op.rename_table("metric_rollups_merged", "metric_rollups")
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_tenant")
            batch.drop_column("tenant")

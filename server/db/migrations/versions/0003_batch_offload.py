"""batch offload: jobs, items, provider batches, worker lease, alerts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "batch_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False, index=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_type", sa.String(100), nullable=False, index=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("schedule", sa.String(8), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(24), nullable=False, index=True),
        sa.Column("accepting", sa.Boolean(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("realtime_cost_usd", sa.Float(), nullable=True),
        sa.Column("savings_usd", sa.Float(), nullable=True),
        sa.Column("cost_booked", sa.Boolean(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("webhook_state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _timestamp("submitted_at", True),
        _timestamp("completed_at", True),
    )
    op.create_index("ix_batch_jobs_created_at", "batch_jobs", ["created_at"])
    op.create_table(
        "batch_items",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "job_id", sa.String(32), sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("custom_id", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("body_digest", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("chunk_id", sa.String(32), nullable=True, index=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("raw", sa.JSON(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _timestamp("completed_at", True),
        sa.UniqueConstraint("job_id", "custom_id"),
    )
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "job_id", sa.String(32), sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False, unique=True),
        sa.Column("provider_batch_id", sa.String(200), nullable=True),
        sa.Column("status", sa.String(24), nullable=False, index=True),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.Column("polls", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("submitted_at", True),
        _timestamp("ended_at", True),
        _timestamp("next_poll_at", True),
    )
    op.create_table(
        "worker_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        _timestamp("expires_at"),
    )
    op.create_table(
        "batch_alerts",
        sa.Column("type", sa.String(32), primary_key=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _timestamp("since"),
        sa.Column("level", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    for table in ("batch_alerts", "worker_leases", "provider_batches", "batch_items", "batch_jobs"):
        op.drop_table(table)

"""openai batches: the files of `/v1/files` and what `/v1/batches` adds to a batch job

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _at(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, server_default="default"),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        _at("created_at", False),
        _at("expires_at", False),
    )
    for column in ("tenant", "created_at", "expires_at"):
        op.create_index(f"ix_files_{column}", "files", [column])
    op.create_table(
        "openai_batches",
        sa.Column("id", sa.String(32), sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, server_default="default"),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(8), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("errors", sa.JSON, nullable=True),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        _at("created_at", False),
        _at("cancelling_at"),
        _at("finalizing_at"),
        _at("finalized_at"),
    )
    for column in ("tenant", "created_at"):
        op.create_index(f"ix_openai_batches_{column}", "openai_batches", [column])


def downgrade() -> None:
    op.drop_table("openai_batches")
    op.drop_table("files")

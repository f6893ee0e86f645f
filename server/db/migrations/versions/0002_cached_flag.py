"""cached flag on records

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("generations", "predictions"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    for table in ("generations", "predictions"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("cached")

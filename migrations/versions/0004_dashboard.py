"""dashboard: the worker's system sample on the job row, and each sample grid's cells (prompts, seeds).

Revision ID: 0004_dashboard
Revises: 0003_workers
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004_dashboard"
down_revision: str | None = "0003_workers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("system", JSON, nullable=True))
    # Existing sample rows get an empty mapping: the ingest fills it at its next resync of a live run.
    op.add_column("samples", sa.Column("meta", JSON, nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("meta")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("system")

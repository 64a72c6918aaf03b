"""workers: each worker's pool, queue and size, with a heartbeat (routing by GPU count).

Revision ID: 0003_workers
Revises: 0002_token_public_id
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_workers"
down_revision: str | None = "0002_token_public_id"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("pool", sa.String(32), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("processes", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_workers"),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])
    # Jobs waiting at the upgrade were sent to the old single queue, which no worker reads any more (workers
    # now consume `<queue>-<pool>`). Marking them unsent makes the reaper send them again, routed by pool;
    # should an old message still be consumed somewhere, the atomic claim makes the second copy a no-op.
    op.execute("UPDATE jobs SET dispatched_at = NULL WHERE status IN ('queued', 'recovering')")


def downgrade() -> None:
    op.drop_index("ix_workers_heartbeat_at", table_name="workers")
    op.drop_table("workers")

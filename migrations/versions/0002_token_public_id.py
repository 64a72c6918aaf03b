"""api_tokens.prefix (the token's first characters, in plain text) becomes public_id (random, unique).

Existing tokens keep working: they are looked up by hash. Each row gets a fresh random id, which
`flashdmd token list` shows and `flashdmd token revoke` takes.

Revision ID: 0002_token_public_id
Revises: 0001
Create Date: 2026-11-27
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_token_public_id"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Plain RENAME COLUMN (Postgres, and SQLite >= 3.25) instead of a batch rebuild: rebuilding api_tokens on
# SQLite would drop a table that jobs.owner_id references while foreign keys are on.
tokens = sa.table("api_tokens", sa.column("id", sa.Integer()), sa.column("public_id", sa.String(16)))


def upgrade() -> None:
    op.alter_column("api_tokens", "prefix", new_column_name="public_id", existing_type=sa.String(16),
                    existing_nullable=False)
    conn = op.get_bind()
    for (row_id,) in conn.execute(sa.select(tokens.c.id)).all():
        conn.execute(tokens.update().where(tokens.c.id == row_id).values(public_id=secrets.token_hex(6)))
    op.create_index("ix_api_tokens_public_id", "api_tokens", ["public_id"], unique=True)


def downgrade() -> None:
    # The ids stay in the column: the old prefixes are gone for good, and they were only for display.
    op.drop_index("ix_api_tokens_public_id", table_name="api_tokens")
    op.alter_column("api_tokens", "public_id", new_column_name="prefix", existing_type=sa.String(16),
                    existing_nullable=False)

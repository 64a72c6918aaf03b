"""Bearer tokens: random, shown once, stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db import utcnow
from api.models import ApiToken

# Writing last_used_at on every request would turn every read into a write; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def create_token(*, session: Session, name: str, prefix: str, token: str | None = None) -> tuple[ApiToken, str]:
    """Store a new token (a fresh random one unless `token` is given); returns the row and the plain token."""
    token = token or generate_token(prefix)
    row = ApiToken(name=name, token_hash=hash_token(token), prefix=token[: len(prefix) + 4])
    session.add(row)
    session.commit()
    return row, token


def find_token(*, session: Session, token: str) -> ApiToken | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def ensure_token(*, session: Session, token: str, name: str) -> ApiToken:
    """The row for a known plain token (e.g. FLASHDMD_TOKEN), creating it on first use."""
    return find_token(session=session, token=token) or create_token(
        session=session, name=name, prefix="", token=token
    )[0]


def touch(*, session: Session, row: ApiToken) -> None:
    """Record use (at most once a minute); the caller commits."""
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now

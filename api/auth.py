"""Bearer tokens: random, shown once, stored only as a sha256 hash, listed by a non-secret id.

A token reads `<prefix><id>_<secret>` (e.g. `fdmd_3f9a0c1b2d4e_<43 url-safe chars>`). The id is random and
public: `flashdmd token list` shows it and `flashdmd token revoke ID` takes it. The row keeps the id and
the hash of the whole token, never any characters of the secret. Tokens from before the id existed (and a
user-chosen FLASHDMD_TOKEN) keep working: lookup is by hash, and migration 0002 gave their rows a random id.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.db import utcnow
from api.models import ApiToken

# Writing last_used_at on every request would turn every read into a write; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# A bootstrap token (FLASHDMD_TOKEN) is a password anyone on the network can try; ours carry 256 bits.
MIN_TOKEN_LENGTH = 32


class TokenError(ValueError):
    """A token operation that cannot be done (unknown id, a revoked FLASHDMD_TOKEN)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_public_id() -> str:
    return secrets.token_hex(6)


def generate_token(prefix: str, public_id: str) -> str:
    return f"{prefix}{public_id}_{secrets.token_urlsafe(32)}"


def create_token(*, session: Session, name: str, prefix: str, token: str | None = None) -> tuple[ApiToken, str]:
    """Store a new token (a fresh random one unless `token` is given); returns the row and the plain token."""
    public_id = new_public_id()
    token = token or generate_token(prefix, public_id)
    row = ApiToken(name=name, token_hash=hash_token(token), public_id=public_id)
    session.add(row)
    session.commit()
    return row, token


def _by_hash(session: Session, token: str) -> ApiToken | None:
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))


def find_token(*, session: Session, token: str) -> ApiToken | None:
    """The live row for a presented token: None when unknown or revoked (checked on every request)."""
    row = _by_hash(session, token)
    if row is None or row.revoked_at is not None:
        return None
    return row


def ensure_token(*, session: Session, token: str, name: str) -> ApiToken:
    """The row for a known plain token (e.g. FLASHDMD_TOKEN), creating it on first use."""
    row = _by_hash(session, token)
    if row is not None and row.revoked_at is not None:
        # Recreating it would silently undo the revocation.
        raise TokenError(f"{name} was revoked (token id {row.public_id}); set a new one")
    return row or create_token(session=session, name=name, prefix="", token=token)[0]


def list_tokens(*, session: Session) -> Sequence[ApiToken]:
    return session.scalars(select(ApiToken).order_by(ApiToken.id)).all()


def revoke_token(*, session: Session, ref: str) -> ApiToken:
    """Revoke by public id (or by the whole token); revoking twice keeps the first time."""
    row = session.scalar(
        select(ApiToken).where(or_(ApiToken.public_id == ref, ApiToken.token_hash == hash_token(ref)))
    )
    if row is None:
        raise TokenError(f"no token with id {ref!r} (see `flashdmd token list`)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def touch(*, session: Session, row: ApiToken) -> None:
    """Record use (at most once a minute); the caller commits."""
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now

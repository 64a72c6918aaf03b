"""FastAPI dependencies: SessionDep, SettingsDep, CurrentToken (full-stack-template style)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.auth import LAST_USED_RESOLUTION, find_token, touch
from api.celery_app import Dispatcher
from api.db import UNAVAILABLE, utcnow
from api.edge import CHALLENGE, TOKEN_STATE
from api.errors import APIError
from api.models import ApiToken
from api.settings import Settings

log = logging.getLogger(__name__)
# Requests that only read get sessions that take no write lock on SQLite (api/db.py, READ_ONLY).
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_session(request: Request) -> Iterator[Session]:
    state = request.app.state
    makers = state.read_sessionmaker if request.method in READ_METHODS else state.sessionmaker
    with makers() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]

# auto_error=False: a missing header must give our 401 error shape, not FastAPI's 403. The scheme is here
# for the OpenAPI document; the token itself is checked by api/edge.py before the body is read.
_bearer = HTTPBearer(auto_error=False, description="a token from `flashdmd token create`")


def lookup_token(*, reads: sessionmaker[Session], writes: sessionmaker[Session], token: str) -> ApiToken | None:
    """The live token row for a plain token, in two short transactions at most.

    The lookup reads only; last_used_at (written at most once a minute) gets its own
    short write transaction, so authentication takes SQLite's write lock once a minute
    per token rather than on every request.
    """
    with reads() as session:
        row = find_token(session=session, token=token)
    if row is None:
        return None
    if row.last_used_at is None or utcnow() - row.last_used_at > LAST_USED_RESOLUTION:
        try:
            with writes() as session:
                fresh = find_token(session=session, token=token)
                if fresh is None:
                    return None
                touch(session=session, row=fresh)
                session.commit()
                row = fresh
        except UNAVAILABLE:
            # Recording the use is bookkeeping: a write lock held elsewhere (SQLite) or a lock timeout must not
            # turn a request the token may make into a 503. The next request records it.
            log.warning("could not record the use of token %s (database busy)", row.public_id)
    return row


def get_current_token(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiToken:
    row = request.scope.get("state", {}).get(TOKEN_STATE)
    if row is None:  # only on a route that api/edge.py lists as public, which must not ask for a token
        raise APIError("unauthorized", "missing bearer token", headers=CHALLENGE)
    return row


CurrentToken = Annotated[ApiToken, Depends(get_current_token)]

"""FastAPI dependencies: SessionDep, SettingsDep, CurrentToken (full-stack-template style)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import find_token, touch
from api.celery_app import Dispatcher
from api.errors import APIError
from api.models import ApiToken
from api.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]

# auto_error=False: a missing header must give our 401 error shape, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="a token from `flashdmd token create`")


def get_current_token(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiToken:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError("unauthorized", "missing bearer token", headers=challenge)
    row = find_token(session=session, token=credentials.credentials)
    if row is None:
        raise APIError("unauthorized", "invalid or revoked token", headers=challenge)
    touch(session=session, row=row)
    # End the lookup's transaction: on SQLite every transaction holds the write lock (api/db.py), and a
    # route may open a second connection (e.g. the /metrics collector) that would wait on this one.
    session.commit()
    return row


CurrentToken = Annotated[ApiToken, Depends(get_current_token)]

"""Authentication (API tokens as Bearer credentials) and authorisation (the token's role must allow the route's
action). Every route declares its action through :func:`requires` (or :data:`PUBLIC`), and records it in the OpenAPI
operation as ``x-warden-action`` so that a test can walk every route and find any that forgot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from warden.core import AuthenticationError
from warden.policy import Action, Principal, authorize

__all__ = ["ACTION_KEY", "PUBLIC", "principal_of", "public", "requires"]

ACTION_KEY = "x-warden-action"
PUBLIC = "public"
_bearer = HTTPBearer(auto_error=False, description="An API token: warden token create --role ROLE")


def requires(action: Action) -> dict[str, Any]:
    """Route keyword arguments that authenticate the caller and authorise ``action``."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthenticationError("this endpoint needs an API token", hint="send 'Authorization: Bearer <token>'")
        authenticate: Callable[[str], Principal] = request.app.state.hub.tokens.authenticate
        principal = await run_in_threadpool(authenticate, credentials.credentials)
        authorize(principal, action)
        request.state.principal = principal
        return principal

    return {"dependencies": [Depends(dependency)], "openapi_extra": {ACTION_KEY: str(action)}}


def public() -> dict[str, Any]:
    return {"openapi_extra": {ACTION_KEY: PUBLIC}}


def principal_of(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal

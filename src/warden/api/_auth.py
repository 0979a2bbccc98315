"""Authentication (API tokens as Bearer credentials) and authorisation (the token's role must allow the route's
action). Every route declares its action through :func:`requires` (or :data:`PUBLIC`), and records it in the OpenAPI
operation as ``x-warden-action`` so that a test can walk every route and find any that forgot."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from warden.core import AuthenticationError
from warden.policy import Action, Principal, authorize

__all__ = ["ACTION_KEY", "PUBLIC", "AuthFirstRoute", "principal_of", "public", "requires"]

ACTION_KEY = "x-warden-action"
PUBLIC = "public"
_bearer = HTTPBearer(auto_error=False, description="An API token: warden token create --role ROLE")


async def _authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None, action: Action
) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthenticationError("this endpoint needs an API token", hint="send 'Authorization: Bearer <token>'")
        authenticate: Callable[[str], Principal] = request.app.state.hub.tokens.authenticate
        principal = await run_in_threadpool(authenticate, credentials.credentials)
        request.state.principal = principal
    authorize(principal, action)
    return principal


def requires(action: Action) -> dict[str, Any]:
    """Route keyword arguments that authenticate the caller and authorise ``action`` (the dependency also puts the
    bearer scheme into the OpenAPI document; :class:`AuthFirstRoute` runs the same check before the body is read)."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        return await _authenticate(request, credentials, action)

    return {"dependencies": [Depends(dependency)], "openapi_extra": {ACTION_KEY: str(action)}}


class AuthFirstRoute(APIRoute):
    """A route that authenticates and authorises before FastAPI reads and parses the request body: an anonymous or
    unauthorised caller gets 401/403, never a parse error, and never makes the hub parse its JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        action = (self.openapi_extra or {}).get(ACTION_KEY)
        if action is None or action == PUBLIC:
            return handler
        required = Action(action)

        async def authenticated(request: Request) -> Response:
            credentials = await _bearer(request)
            await _authenticate(request, credentials, required)
            return await handler(request)

        return authenticated


def public() -> dict[str, Any]:
    return {"openapi_extra": {ACTION_KEY: PUBLIC}}


def principal_of(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal

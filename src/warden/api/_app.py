"""The hub's ASGI application: EST, revocation distribution, the operator API, health and metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from warden.api import _est, _pki, _v1
from warden.api._auth import public, requires
from warden.api._edge import DirectHandler, Edge
from warden.api._metrics import Metrics
from warden.api._problems import install_handlers
from warden.api._ratelimit import MultiLimiter, RateLimiter
from warden.core import DEFAULT_LIMITS
from warden.hub import Hub
from warden.policy import Action
from warden.provisioning import certs_only

__all__ = ["create_app"]


def create_app(
    hub: Hub,
    *,
    metrics: Metrics | None = None,
    on_trust_change: Callable[[], None] | None = None,
) -> Edge:
    """The ASGI app for ``hub``: the FastAPI app (``.app``) wrapped in the request edge (request ids, access log,
    metrics, body limit)."""
    app = FastAPI(
        title="Warden operator API",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    metrics = metrics or Metrics()
    settings = hub.settings
    app.state.hub = hub
    app.state.metrics = metrics
    app.state.on_trust_change = on_trust_change
    app.state.enroll_limiter = MultiLimiter(
        [
            (
                "address",
                RateLimiter(
                    rate=settings.enroll_rate_per_address,
                    burst=settings.enroll_burst_per_address,
                    max_keys=settings.rate_limit_max_keys,
                ),
            ),
            (
                "client",
                RateLimiter(
                    rate=settings.enroll_rate_per_client,
                    burst=settings.enroll_burst_per_client,
                    max_keys=settings.rate_limit_max_keys,
                ),
            ),
        ]
    )
    # Worker threads for EST requests that must plan (or write) where they may block: bounded.
    app.state.issue_limiter = anyio.CapacityLimiter(256)
    chain = hub.provisioning.chain
    app.state.cacerts = certs_only(chain)
    app.state.chain_pem = hub.chain_pem()
    app.state.crl_cache = _pki.CrlCache(hub)
    app.state.ocsp_cache = _pki.OcspCache()
    install_handlers(app)
    # The routers' routes are added to the app itself (their paths carry the prefix already), so that app.routes
    # lists every route flat: the authorisation test walks it.
    for router in (_est.router, _pki.router, _v1.router):
        app.router.routes.extend(router.routes)

    @app.get("/healthz", include_in_schema=False, **public())
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False, **requires(Action.METRICS_READ))
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    direct = {
        (method, route.path): _direct(app, route)
        for route in app.router.routes
        if isinstance(route, APIRoute) and route.path in _est.DIRECT_PATHS
        for method in route.methods or ()
    }
    return Edge(app, metrics=metrics, max_body=DEFAULT_LIMITS.max_request_body_bytes, direct=direct)


def _direct(app: FastAPI, route: APIRoute) -> DirectHandler:
    """``route`` served without FastAPI's router, middleware stack and dependency solving: the same endpoint and
    the same exception handlers, and the route in the scope (the edge's metrics take their label from it). Only a
    route whose endpoint takes nothing but the request qualifies."""
    dependant = route.dependant
    if (
        dependant.dependencies
        or dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.body_params
        or dependant.request_param_name is None
    ):
        raise ValueError(f"route {route.path} takes more than the request: it cannot be served directly")
    endpoint = route.endpoint
    handlers: dict[Any, Any] = app.exception_handlers

    async def handle(scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = app
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = next((handlers[kind] for kind in type(exc).__mro__ if kind in handlers), None)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    return handle

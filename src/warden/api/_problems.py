"""Errors as RFC 9457 problem details (``application/problem+json``) for the operator API and the PKI endpoints;
EST answers plain text as RFC 7030 section 4.2.3 asks. Nothing a client sends is echoed back beyond what our own
error messages quote (bounded), and a 5xx never carries internals."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from warden.api._logging import request_id
from warden.core import (
    AlreadyExistsError,
    AuthenticationError,
    CSRRejectedError,
    IllegalTransitionError,
    InvalidInputError,
    IssuanceRefusedError,
    NotFoundError,
    NotInitialisedError,
    OCSPRequestError,
    PermissionDeniedError,
    RateLimitedError,
    WardenError,
)

__all__ = ["PROBLEM_MEDIA_TYPE", "install_handlers", "problem", "status_for"]

log = logging.getLogger("warden.api")
PROBLEM_MEDIA_TYPE = "application/problem+json"

_STATUS: tuple[tuple[type[WardenError], int, str], ...] = (
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (IssuanceRefusedError, 403, "issuance-refused"),
    (RateLimitedError, 429, "rate-limited"),
    (NotFoundError, 404, "not-found"),
    (AlreadyExistsError, 409, "already-exists"),
    (IllegalTransitionError, 409, "illegal-transition"),
    (CSRRejectedError, 400, "csr-rejected"),
    (OCSPRequestError, 400, "bad-ocsp-request"),
    (InvalidInputError, 400, "invalid-input"),
    (NotInitialisedError, 503, "not-initialised"),
)


def status_for(error: WardenError) -> tuple[int, str]:
    for kind, status, slug in _STATUS:
        if isinstance(error, kind):
            return status, slug
    return 500, "internal"


def _headers(status: int, error: Exception | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="warden"'
    if isinstance(error, RateLimitedError):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return headers


def problem(status: int, slug: str, title: str, detail: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": f"urn:warden:problem:{slug}", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    rid = request_id.get()
    if rid:
        body["request_id"] = rid
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def _is_est(request: Request) -> bool:
    return request.url.path.startswith("/.well-known/est/")


def _render(
    request: Request, status: int, slug: str, title: str, detail: str | None, error: Exception | None
) -> Response:
    headers = _headers(status, error)
    if _is_est(request):
        return PlainTextResponse((detail or title) + "\n", status_code=status, headers=headers)
    response = problem(status, slug, title, detail)
    response.headers.update(headers)
    return response


async def _warden_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WardenError)
    status, slug = status_for(exc)
    if status >= 500:
        log.error("request failed: %s", type(exc).__name__, exc_info=exc)
        return _render(request, status, slug, "internal error", None, exc)
    return _render(request, status, slug, slug.replace("-", " "), exc.diagnostics(), exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(p) for p in e.get("loc", ())][:8],
            "msg": str(e.get("msg", ""))[:200],
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()[:20]
    ]
    if _is_est(request):
        return PlainTextResponse("malformed request\n", status_code=400)
    return problem(
        422, "validation", "request validation failed", "the request does not match the schema", errors=errors
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 415: "unsupported-media-type"}.get(
        exc.status_code, "http-error"
    )
    detail = exc.detail if isinstance(exc.detail, str) else None
    response = _render(request, exc.status_code, slug, slug.replace("-", " "), detail, None)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return _render(request, 500, "internal", "internal error", None, None)


def install_handlers(app: Any) -> None:
    app.add_exception_handler(WardenError, _warden_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

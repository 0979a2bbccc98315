"""EST (RFC 7030, with RFC 8951) under ``/.well-known/est/``: ``cacerts``, ``simpleenroll``, ``simplereenroll``.

The client's certificate comes from the ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``),
which Warden's uvicorn protocol fills in (docs/adr/0004-est-client-certificates.md). Rate limits apply before the
body is read: per source address and per client identity (onboarding certificate, operational certificate or token
id). Errors are plain text (RFC 7030 section 4.2.3), with ``Retry-After`` on 429 and ``WWW-Authenticate`` on 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import ssl
import weakref
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from warden.api._auth import public
from warden.core import AuthenticationError, InvalidInputError, RateLimitedError, WardenError
from warden.hub import Hub
from warden.provisioning import (
    CERTS_ONLY_MEDIA_TYPE,
    EnrollmentPlan,
    EnrollmentResult,
    certs_only,
    decode_csr_body,
    max_body_bytes,
)

__all__ = ["DIRECT_PATHS", "client_certificate", "router"]

router = APIRouter(prefix="/.well-known/est", include_in_schema=False)
_B64_HEADERS = {"Content-Transfer-Encoding": "base64"}
_MAX_BODY = max_body_bytes()
#: served by the edge without FastAPI's routing (see create_app): enrollment is the hub's hottest request
DIRECT_PATHS = frozenset({"/.well-known/est/simpleenroll", "/.well-known/est/simplereenroll"})
_TOKEN_ID = re.compile(r"[a-z]{2,4}_[0-9a-f]{16}")


def client_certificate(scope: Any) -> bytes | None:
    """The DER certificate the client presented in the TLS handshake (verified there), if any."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or ()
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _token_from(request: Request) -> str | None:
    """An enrollment token from ``Authorization: Bearer`` or the password of ``Authorization: Basic``."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    if len(header) > 512:
        raise AuthenticationError("the Authorization header is too long")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthenticationError("malformed Basic credentials") from None
        return decoded.partition(":")[2]
    raise AuthenticationError("unsupported authorization scheme", hint="use Bearer or Basic")


def _rate_limit(request: Request, identity: str | None) -> None:
    keys = {"address": _source(request)}
    if identity is not None:
        keys["client"] = identity
    refused = request.app.state.enroll_limiter.check(keys)
    if refused is not None:
        name, retry_after = refused
        request.app.state.metrics.rate_limited.labels(name).inc()
        raise RateLimitedError(f"too many enrollment requests from this {name}", retry_after=retry_after)


async def _read_csr(request: Request, actor: str) -> bytes:
    """The request's CSR; a body that is refused before the use cases see it is audited here."""
    try:
        return await _read_body(request)
    except WardenError as e:
        hub: Hub = request.app.state.hub
        operation = request.url.path.rsplit("/", 1)[-1]
        reason = e.message
        await anyio.to_thread.run_sync(
            lambda: hub.provisioning.audit_refusal(
                # A token is not checked before the body is read: its holder is not authenticated yet.
                authenticated=not actor.startswith("token:"),
                actor=actor,
                action="enrollment.reenroll" if operation == "simplereenroll" else "enrollment.enroll",
                target=f"est:{operation}",
                reason=reason,
                source=_source(request),
            )
        )
        raise


async def _read_body(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("application/pkcs10"):
        raise InvalidInputError(
            "an EST request body is application/pkcs10", hint="set Content-Type: application/pkcs10"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY:
            raise InvalidInputError(f"the request body is larger than {_MAX_BODY} bytes")
    return decode_csr_body(bytes(body))


class _LoopSink:
    """Takes the group committer's results back onto the event loop: one wake-up per committed batch, however many
    of the loop's requests it held (a thread per waiting request cost more than the enrollment's database work),
    or none when the loop commits itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def deliver(self, outcomes: list[tuple[Any, bool, Any]]) -> None:
        try:
            in_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            in_loop = False
        if in_loop:  # the loop commits itself (LoopCommitter)
            _settle(outcomes)
        else:
            self._loop.call_soon_threadsafe(_settle, outcomes)


def _settle(outcomes: list[tuple[Any, bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.done():  # the request was cancelled (the client went away); its certificate is recorded anyway
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
            # Marked as seen: when its request was cancelled, nobody awaits it, and asyncio would log it.
            future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_sinks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSink] = weakref.WeakKeyDictionary()


async def _write(hub: Hub, plan: EnrollmentPlan, limiter: anyio.CapacityLimiter) -> EnrollmentResult:
    """``plan`` through the hub's group committer, the loop waiting on a future; a hub without a committer writes
    in a worker thread."""
    loop = asyncio.get_running_loop()
    sink = _sinks.get(loop)
    if sink is None:
        sink = _sinks.setdefault(loop, _LoopSink(loop))
    future: asyncio.Future[Any] = loop.create_future()
    if hub.submit_write(plan.issue.fn, plan.issue.item, sink, future):
        # Shielded: a client that goes away does not cancel a write the committer has taken already.
        return plan.finish(await asyncio.shield(future))
    return await anyio.to_thread.run_sync(hub.provisioning.complete, plan, limiter=limiter)


async def _issue(
    request: Request,
    operation: str,
    fn: Callable[[], EnrollmentPlan],
    nowait: Callable[[], EnrollmentPlan | None] | None = None,
) -> Response:
    metrics = request.app.state.metrics
    limiter = request.app.state.issue_limiter
    try:
        # The checks before the write run on the loop when they need no database (``nowait``), else in a worker
        # thread (they may read the database, and a refusal writes its audit record); the write itself goes to
        # the group committer without holding a thread.
        plan = nowait() if nowait is not None else None
        if plan is None:
            plan = await anyio.to_thread.run_sync(fn, limiter=limiter)
        result = await _write(request.app.state.hub, plan, limiter)
    except WardenError as e:
        metrics.est.labels(operation, type(e).__name__).inc()
        raise
    metrics.est.labels(operation, "issued").inc()
    return Response(
        certs_only([result.issued.certificate]),
        media_type=CERTS_ONLY_MEDIA_TYPE,
        headers=_B64_HEADERS,
    )


@router.get("/cacerts", **public())
async def cacerts(request: Request) -> Response:
    body: bytes = request.app.state.cacerts
    return Response(body, media_type="application/pkcs7-mime", headers=_B64_HEADERS)


@router.post("/simpleenroll", **public())
async def simpleenroll(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    token = _token_from(request)
    certificate = client_certificate(request.scope)
    if token is not None:
        # The id part names the client for rate limiting and the audit log: only a well-formed id is used as given.
        token_id = token.partition(".")[0]
        if not _TOKEN_ID.fullmatch(token_id):
            token_id = "malformed"  # noqa: S105 - a label, not a secret
        _rate_limit(request, "token:" + token_id)
        csr = await _read_csr(request, f"token:{token_id}")
        source = _source(request)
        return await _issue(
            request, "simpleenroll", lambda: hub.provisioning.plan_with_token(token, csr, source=source)
        )
    if certificate is None:
        _rate_limit(request, None)
        raise AuthenticationError(
            "simpleenroll needs an onboarding certificate (TLS client certificate) or an enrollment token",
            hint="present the device's IDevID, or send the token as HTTP Basic password or Bearer",
        )
    fingerprint = hashlib.sha256(certificate).hexdigest()
    _rate_limit(request, "cert:" + fingerprint[:32])
    csr = await _read_csr(request, f"onboarding:{fingerprint[:16]}")
    source = _source(request)
    return await _issue(
        request,
        "simpleenroll",
        lambda: hub.provisioning.plan_with_certificate(certificate, csr, source=source),
        lambda: hub.provisioning.plan_with_certificate_nowait(certificate, csr, source=source),
    )


@router.post("/simplereenroll", **public())
async def simplereenroll(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    certificate = client_certificate(request.scope)
    if certificate is None:
        _rate_limit(request, None)
        raise AuthenticationError(
            "simplereenroll needs the device's current operational certificate as TLS client certificate"
        )
    fingerprint = hashlib.sha256(certificate).hexdigest()
    _rate_limit(request, "cert:" + fingerprint[:32])
    csr = await _read_csr(request, f"certificate:{fingerprint[:16]}")
    source = _source(request)
    return await _issue(
        request, "simplereenroll", lambda: hub.provisioning.plan_reenroll(certificate, csr, source=source)
    )

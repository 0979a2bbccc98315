"""Revocation distribution: ``/pki/ca`` (the chain), ``/pki/crl`` (the current CRL, DER, cacheable until its
nextUpdate) and ``/pki/ocsp`` (RFC 6960 over POST, and GET with the request base64 in the path, RFC 5019)."""

from __future__ import annotations

import base64
import binascii
import email.utils
import threading
import time
import urllib.parse

import anyio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from fastapi import APIRouter, Request
from starlette.responses import Response

from warden.api._auth import public
from warden.core import DEFAULT_LIMITS, InvalidInputError, NotFoundError, OCSPRequestError
from warden.hub import Hub
from warden.registry import PublishedCrl

__all__ = ["CrlCache", "OcspCache", "router"]

router = APIRouter(prefix="/pki", include_in_schema=False)
_OCSP_RESPONSE = "application/ocsp-response"


class CrlCache:
    """The newest published CRL, re-read from the database at most once a second (other workers publish too)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._crl: PublishedCrl | None = None
        self._checked = 0.0
        self._number: int | None = None
        self._number_checked = -1.0
        self._lock = threading.Lock()

    def number_is_stale(self) -> bool:
        return time.monotonic() - self._number_checked >= 1.0

    def refresh_number(self) -> None:
        """Re-read the current CRL's number (a database call: run it in a worker thread)."""
        number = self._hub.certificates.crl_number()
        with self._lock:
            self._number, self._number_checked = number, time.monotonic()

    @property
    def cached_number(self) -> int | None:
        """The current CRL's number as last read (see :meth:`refresh_number`)."""
        return self._number

    def get(self) -> PublishedCrl | None:
        """The newest CRL (database calls: run it in a worker thread)."""
        now = time.monotonic()
        with self._lock:
            if self._crl is not None and now - self._checked < 1.0:
                return self._crl
            self._checked = now
            number = self._hub.certificates.crl_number()
            if number is not None and (self._crl is None or self._crl.number != number):
                self._crl = self._hub.certificates.current_crl()
            return self._crl


@router.get("/ca", **public())
async def ca_chain(request: Request) -> Response:
    return Response(request.app.state.chain_pem, media_type="application/pem-certificate-chain")


@router.get("/crl", **public())
async def crl(request: Request) -> Response:
    cache: CrlCache = request.app.state.crl_cache
    current = await anyio.to_thread.run_sync(cache.get)
    if current is None:
        raise NotFoundError("no CRL has been published yet", hint="the hub publishes one at start")
    etag = f'"crl-{current.number}"'
    remaining = max(0, int(current.next_update.timestamp() - time.time()))
    headers = {
        "ETag": etag,
        "Last-Modified": email.utils.format_datetime(current.this_update, usegmt=True),
        "Expires": email.utils.format_datetime(current.next_update, usegmt=True),
        "Cache-Control": f"public, max-age={remaining}, must-revalidate",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(current.der, media_type="application/pkix-crl", headers=headers)


class OcspCache:
    """Signed answers to nonce-less OCSP requests (RFC 5019: the form devices and brokers send at scale), reused
    for up to ``max_age`` and only while the published CRL is the same: the leader publishes a new CRL within about
    a second of any revocation, so a cached "good" outlives a revocation by about that much. Requests with a nonce
    are always signed afresh. At most ``max_entries`` answers are kept (oldest dropped first)."""

    def __init__(self, *, max_entries: int = 20_000, max_age: float = 60.0) -> None:
        self._entries: dict[tuple[str, bytes, int], tuple[bytes, float, int | None]] = {}
        self._max_entries = max_entries
        self._max_age = max_age

    @staticmethod
    def key(der: bytes) -> tuple[str, bytes, int] | None:
        """The cache key of a request: its CertID (hash algorithm, issuer key hash, serial), a few dozen bytes
        whatever the request's size. None when it has a nonce or does not parse (then the responder decides)."""
        try:
            request = ocsp.load_der_ocsp_request(der)
            if any(isinstance(e.value, x509.OCSPNonce) for e in request.extensions):
                return None
            return (request.hash_algorithm.name, request.issuer_key_hash[:64], request.serial_number)
        except (ValueError, TypeError):
            return None

    def get(self, key: tuple[str, bytes, int], crl_number: int | None) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        answer, stored, number = entry
        if number != crl_number or time.monotonic() - stored > self._max_age:
            self._entries.pop(key, None)
            return None
        return answer

    def put(self, key: tuple[str, bytes, int], answer: bytes, crl_number: int | None) -> None:
        if len(self._entries) >= self._max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (answer, time.monotonic(), crl_number)


def _answer(hub: Hub, der: bytes) -> bytes:
    try:
        return hub.certificates.ocsp_respond(der, actor="hub")
    except OCSPRequestError:
        # RFC 6960 section 2.3: a request that cannot be parsed gets an OCSP "malformedRequest" answer.
        return ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST).public_bytes(
            serialization.Encoding.DER
        )


async def _respond(request: Request, der: bytes) -> Response:
    hub: Hub = request.app.state.hub
    cache: OcspCache = request.app.state.ocsp_cache
    crl: CrlCache = request.app.state.crl_cache
    key = OcspCache.key(der)
    if crl.number_is_stale():
        await anyio.to_thread.run_sync(crl.refresh_number)  # at most once a second, never on the event loop
    number = crl.cached_number
    answer = cache.get(key, number) if key is not None else None
    if answer is None:
        answer = await anyio.to_thread.run_sync(_answer, hub, der)
        if key is not None:
            cache.put(key, answer, number)
    return Response(answer, media_type=_OCSP_RESPONSE, headers={"Cache-Control": "max-age=0, no-cache"})


@router.post("/ocsp", **public())
async def ocsp_post(request: Request) -> Response:
    if request.headers.get("content-type", "").lower() != "application/ocsp-request":
        raise InvalidInputError("an OCSP request is application/ocsp-request")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > DEFAULT_LIMITS.max_ocsp_request_bytes:
            raise InvalidInputError("the OCSP request is too large")
    return await _respond(request, bytes(body))


@router.get("/ocsp/{encoded:path}", **public())
async def ocsp_get(request: Request, encoded: str) -> Response:
    if len(encoded) > DEFAULT_LIMITS.max_ocsp_request_bytes * 2:
        raise InvalidInputError("the OCSP request is too large")
    try:
        der = base64.b64decode(urllib.parse.unquote(encoded), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("the OCSP request in the URL is not base64") from None
    return await _respond(request, der)

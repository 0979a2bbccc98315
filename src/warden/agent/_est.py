"""The agent's EST client (RFC 7030): ``cacerts``, ``simpleenroll`` and ``simplereenroll`` over HTTPS.

Only the standard library's ``http.client`` and ``ssl``: the agent's TLS identity is installed into an
``ssl.SSLContext`` (from a file, or from a PKCS#11 token through OpenSSL), and the hub is verified against the
pinned root with its name checked, also when the agent connects to a configured address instead of resolving it.
Every response is size-limited; a refusal keeps the hub's plain-text reason (RFC 7030 section 4.2.3).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import http.client
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from warden.agent._config import HubConfig
from warden.core import TLS12_CIPHERS, WardenError

__all__ = ["EstClient", "EstError", "EstRefusedError", "EstResult", "EstUnavailableError", "client_context"]

_MAX_RESPONSE = 256 * 1024
_MAX_REASON = 1024
#: installs a TLS client identity into a context (None: no client certificate)
Identity = Callable[[ssl.SSLContext], None]


class EstError(WardenError):
    """The hub could not be asked, or answered something that is not EST."""

    exit_code = 14


class EstUnavailableError(EstError):
    """The hub is unreachable, overloaded or asked to retry later: keep the current certificate and try again."""

    def __init__(self, message: str, *, retry_after: float | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class EstRefusedError(EstError):
    """The hub refused the request (4xx): retrying the same request will not help."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class EstResult:
    """Issued certificates (leaf first) and the hub's clock as the response's ``Date`` header gave it."""

    certificates: list[x509.Certificate]
    #: hub time minus local time in seconds (positive: the device's clock is behind); None without a Date header
    clock_offset: float | None


def client_context(ca: Path) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts only ``ca`` and checks the peer's name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise EstError(f"cannot load the pinned hub CA {ca}: {getattr(e, 'strerror', None) or e}") from None
    return context


class _Connection(http.client.HTTPSConnection):
    """Connects to ``address`` (when given) but verifies and sends SNI for the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str | None, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._address = address
        self._tls_context = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address or self.host, self.port), self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self._tls_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class EstClient:
    def __init__(self, hub: HubConfig) -> None:
        self._hub = hub

    def cacerts(self) -> list[x509.Certificate]:
        _status, body, _ = self._request("GET", "cacerts", None, identity=None, token=None)
        return _certs_only(body)

    def simpleenroll(self, csr_der: bytes, *, identity: Identity | None, token: str | None = None) -> EstResult:
        return self._enroll("simpleenroll", csr_der, identity=identity, token=token)

    def simplereenroll(self, csr_der: bytes, *, identity: Identity) -> EstResult:
        return self._enroll("simplereenroll", csr_der, identity=identity, token=None)

    def _enroll(self, operation: str, csr_der: bytes, *, identity: Identity | None, token: str | None) -> EstResult:
        body = base64.encodebytes(csr_der)
        sent = time.time()
        _, answer, date = self._request("POST", operation, body, identity=identity, token=token)
        received = time.time()
        offset = None
        if date is not None:
            # The Date header has one-second resolution and is set during the request: compare to the midpoint.
            offset = date.timestamp() - (sent + received) / 2
        return EstResult(_certs_only(answer), offset)

    def _request(
        self, method: str, operation: str, body: bytes | None, *, identity: Identity | None, token: str | None
    ) -> tuple[int, bytes, dt.datetime | None]:
        context = client_context(self._hub.ca)
        if identity is not None:
            identity(context)
        connection = _Connection(
            self._hub.host,
            self._hub.port,
            address=self._hub.address,
            context=context,
            timeout=self._hub.timeout_seconds,
        )
        headers = {"Accept": "application/pkcs7-mime", "Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/pkcs10"
            headers["Content-Transfer-Encoding"] = "base64"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        path = f"{self._hub.path_prefix}/.well-known/est/{operation}"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read(_MAX_RESPONSE + 1)
            status = response.status
            retry_after = response.getheader("Retry-After")
            date_header = response.getheader("Date")
        except ssl.SSLCertVerificationError as e:
            raise EstError(
                f"the hub at {self._hub.url} failed certificate verification: {e.verify_message}",
                hint="is hub.ca the hub's root, and does the URL's host name match the hub's certificate?",
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise EstUnavailableError(f"cannot reach the hub at {self._hub.url}: {_describe(e)}") from None
        finally:
            connection.close()
        if len(data) > _MAX_RESPONSE:
            raise EstError(f"the hub's {operation} answer is larger than {_MAX_RESPONSE} bytes")
        if status == 200:
            return status, data, _parse_date(date_header)
        reason = data[:_MAX_REASON].decode("utf-8", errors="replace").strip() or http.client.responses.get(status, "")
        if status in (202, 429, 503) or status >= 500:
            raise EstUnavailableError(
                f"the hub answered {operation} with {status}: {reason}", retry_after=_retry_after(retry_after)
            )
        raise EstRefusedError(f"the hub refused {operation} ({status}): {reason}", status=status)


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), 86400.0))
    except ValueError:
        return None


def _parse_date(value: str | None) -> dt.datetime | None:
    if not value or len(value) > 64:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _certs_only(body: bytes) -> list[x509.Certificate]:
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
        certificates = pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError):
        raise EstError("the hub's answer is not a base64 PKCS#7 certs-only message") from None
    if not certificates:
        raise EstError("the hub's answer holds no certificate")
    return list(certificates)

"""Helpers for talking to a running hub (tests/hubserver.py) with tools we did not write: ``curl`` for HTTP and EST,
``openssl`` for CSRs, PKCS#7, certificates, OCSP and TLS. State is inspected through the operator API."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import openssl
from tests.hubserver import HubServer, Issued

T = TypeVar("T")

#: curl exit statuses of a connection the server ended in (or right after) the TLS handshake: 35 SSL connect error,
#: 52 empty reply (TLS 1.3: the client's side of the handshake was done when the server refused its certificate),
#: 56 failure receiving data
HANDSHAKE_REFUSED = frozenset({35, 52, 56})
_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Answer:
    rc: int
    status: int
    body: bytes
    headers: dict[str, str]
    err: str

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def __str__(self) -> str:
        return f"curl exit {self.rc}, HTTP {self.status}: {self.text[:300]!r} {self.err[:300]!r}"


@dataclass
class Csr:
    der: Path
    key: Path
    #: the EST request body: the DER CSR in base64 (made by ``openssl base64``)
    body: Path


class Interop:
    """curl and openssl against one hub, with files in ``work``; ``admin`` reads state through the operator API."""

    def __init__(self, hub: HubServer, work: Path) -> None:
        assert shutil.which("curl"), "curl is not installed"
        self.hub = hub
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.viewer = hub.token("viewer")
        self.admin = hub.client(headers={"Authorization": f"Bearer {hub.token('security-admin')}"})

    def close(self) -> None:
        self.admin.close()

    def path(self, stem: str, suffix: str) -> Path:
        return self.work / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"

    # -- curl -------------------------------------------------------------------------------------------------------

    def curl(self, path: str, *args: str) -> Answer:
        body, head = self.path("body", ".bin"), self.path("head", ".txt")
        proc = subprocess.run(
            [
                *("curl", "-sS", *self.hub.curl_resolve()),
                *("-o", str(body), "-D", str(head), "-w", "%{http_code}"),
                *args,
                self.hub.url + path,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        headers: dict[str, str] = {}
        if head.exists():
            # The last response's headers (a 100 Continue may come first).
            block = head.read_text(errors="replace").strip().split("\r\n\r\n")[-1]
            for line in block.splitlines()[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return Answer(
            proc.returncode,
            int(proc.stdout or 0),
            body.read_bytes() if body.exists() else b"",
            headers,
            proc.stderr,
        )

    def est(
        self,
        operation: str,
        body: Path,
        *,
        client: Issued | tuple[Path, Path] | None = None,
        auth: tuple[str, ...] = (),
        content_type: str = "application/pkcs10",
    ) -> Answer:
        args = ["-H", f"Content-Type: {content_type}", "--data-binary", f"@{body}", *auth]
        if client is not None:
            cert, key = (client.cert_path, client.key_path) if isinstance(client, Issued) else client
            args += ["--cert", str(cert), "--key", str(key)]
        return self.curl(f"/.well-known/est/{operation}", *args)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the ``/metrics`` samples called ``name`` whose labels include ``labels`` (read with the viewer
        token)."""
        answer = self.curl("/metrics", "-H", f"Authorization: Bearer {self.viewer}")
        assert answer.status == 200, answer
        total = 0.0
        for line in answer.text.splitlines():
            match = _SAMPLE.fullmatch(line)
            if match is None or match["name"] != name:
                continue
            found = dict(_LABEL.findall(match["labels"] or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match["value"])
        return total

    def handshake_failures(self, alert: str | None = None) -> float:
        """``warden_tls_handshake_failures_total``, for one TLS alert or all."""
        labels = {"alert": alert} if alert is not None else {}
        return self.metric("warden_tls_handshake_failures_total", **labels)

    # -- openssl ----------------------------------------------------------------------------------------------------

    def csr(self, common_name: str, *extra: str) -> Csr:
        """``openssl req`` makes a P-256 key and a DER CSR; ``openssl base64`` makes the EST body."""
        der, key, body = self.path(common_name, ".csr"), self.path(common_name, ".key"), self.path(common_name, ".b64")
        openssl(
            *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-keyout", str(key), "-subj", f"/CN={common_name}", "-outform", "DER", "-out", str(der), *extra),
        )
        openssl("base64", "-in", str(der), "-out", str(body))
        return Csr(der, key, body)

    def certificates(self, answer: Answer) -> list[Path]:
        """The certificates of a base64 PKCS#7 certs-only answer (``base64 -d`` and ``openssl pkcs7 -print_certs``),
        one PEM file each."""
        encoded, der = self.path("p7", ".b64"), self.path("p7", ".der")
        encoded.write_bytes(answer.body)
        with der.open("wb") as out:
            subprocess.run(["base64", "-d", str(encoded)], stdout=out, check=True, timeout=30)
        printed = openssl("pkcs7", "-inform", "DER", "-in", str(der), "-print_certs").stdout.decode()
        blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", printed, re.DOTALL)
        paths = []
        for block in blocks:
            path = self.path("cert", ".pem")
            path.write_text(block)
            paths.append(path)
        return paths

    def verify(self, cert: Path, *extra: str) -> tuple[int, str]:
        proc = openssl(
            "verify",
            *("-CAfile", str(self.hub.root_path), "-untrusted", str(self.issuing)),
            *extra,
            str(cert),
            check=False,
        )
        return proc.returncode, (proc.stdout + proc.stderr).decode()

    @property
    def issuing(self) -> Path:
        return self.hub.data_dir / "ca" / "issuing-ca.pem"

    # -- state through the operator API -----------------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        response = self.admin.get("/api/v1" + path, params=params)
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return response.json()

    def device(self, device_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.api(f"/devices/{device_id}")
        return result

    def state(self, device_id: str) -> str | None:
        """The device's state, or None when it is not registered."""
        device = self.device(device_id)
        return None if device is None else str(device["state"])

    def certificates_of(self, device_id: str) -> list[dict[str, Any]]:
        return list(self.api("/certificates", device_id=device_id, limit=1000)["items"])

    def enrollments_of(self, device_id: str) -> list[dict[str, Any]]:
        return list(self.api("/enrollments", device_id=device_id, limit=1000)["items"])

    def audit_seq(self) -> int:
        """The sequence number of the newest audit record."""
        seq, cursor = 0, 0
        while True:
            page = self.api("/audit", cursor=cursor, limit=1000)
            if page["items"]:
                seq = page["items"][-1]["seq"]
            if page["next_cursor"] is None:
                return seq
            cursor = page["next_cursor"]

    def denied(self, seq: int, action: str, target: str) -> list[dict[str, Any]]:
        """The audit records after ``seq`` of a denied ``action`` on ``target``."""
        return [
            r
            for r in self.audit_after(seq)
            if r["action"] == action and r["target"] == target and r["outcome"] == "denied"
        ]

    def audit_about(self, seq: int, device_id: str) -> list[dict[str, Any]]:
        """The audit records after ``seq`` by or about ``device_id`` (the hub's own jobs write records too)."""
        name = f"device:{device_id}"
        return [r for r in self.audit_after(seq) if name in (r["actor"], r["target"])]

    def audit_after(self, seq: int) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        cursor = seq
        while True:
            page = self.api("/audit", cursor=cursor, limit=1000)
            records += page["items"]
            if page["next_cursor"] is None:
                return records
            cursor = page["next_cursor"]


def serial_of(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-serial").stdout.decode().strip().removeprefix("serial=")


def describe(cert: Path) -> str:
    """Subject, SAN and serial as openssl prints them."""
    return openssl("x509", "-in", str(cert), "-noout", "-subject", "-ext", "subjectAltName", "-serial").stdout.decode()


def public_key(path: Path, *, private: bool = False) -> str:
    if private:
        return openssl("pkey", "-in", str(path), "-pubout").stdout.decode()
    return openssl("x509", "-in", str(path), "-noout", "-pubkey").stdout.decode()


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def eventually(probe: Callable[[], T | None], *, within: float = 15.0, every: float = 0.25, what: str = "") -> T:
    """Poll ``probe`` until it returns something other than None or False; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None and last is not False:
            return last
        time.sleep(every)
    raise AssertionError(f"not within {within} s: {what} (last: {last})")

"""EST, OCSP and CRL against a real ``warden serve``, with tools we did not write: ``curl`` is the device (TLS client
certificate, Bearer and Basic tokens), ``openssl`` makes its keys and CSRs, opens the PKCS#7 answers, verifies the
certificates and asks OCSP. Operator actions go through the ``warden`` CLI in its own process, as an operator's
would; state is read back through the operator API.

One hub serves the whole module: every test uses devices of its own.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import openssl
from tests.hubserver import FLEET, HUB_NAME, HubServer, Issued, ManufacturerCA, self_signed, start_hub
from tests.integration._interop import (
    HANDSHAKE_REFUSED,
    Answer,
    Csr,
    Interop,
    describe,
    eventually,
    public_key,
    quote,
    serial_of,
)

CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"


@dataclass
class Env:
    hub: HubServer
    tools: Interop
    #: the manufacturer CA of the enrollment group "acme"
    maker: ManufacturerCA


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("est-interop")
    hub = start_hub(base)
    tools: Interop | None = None
    try:
        tools = Interop(hub, base / "work")
        maker = ManufacturerCA(base / "maker")
        hub.warden("enrollment", "group", "add", "acme", "--ca", str(maker.path))
        # The listener trusts the group's CA once its trust store reloaded (polled every second).
        probe = maker.idevid("probe-0")
        eventually(lambda: tools.curl("/healthz", "--cert", str(probe.cert_path), "--key", str(probe.key_path)).rc == 0)
        yield Env(hub, tools, maker)
    finally:
        if tools is not None:
            tools.close()
        hub.stop()


def enroll(env: Env, device_id: str, idevid: Issued | None = None) -> tuple[Path, Csr]:
    """Onboard ``device_id`` with curl and its IDevID; the operational certificate and the CSR (with its key)."""
    idevid = idevid or env.maker.idevid(device_id)
    csr = env.tools.csr(device_id)
    answer = env.tools.est("simpleenroll", csr.body, client=idevid)
    assert answer.status == 200, answer
    (cert,) = env.tools.certificates(answer)
    return cert, csr


@dataclass
class Credentials:
    """How a device authenticates a ``simpleenroll``: its IDevID, or curl arguments carrying a token."""

    client: Issued | None = None
    auth: tuple[str, ...] = ()

    @classmethod
    def of(cls, env: Env, device_id: str, kind: str) -> Credentials:
        if kind == "idevid":
            return cls(client=env.maker.idevid(device_id))
        token = json.loads(env.hub.warden("enrollment", "add", device_id, "--token", "--json").stdout)["token"]
        if kind == "bearer":
            return cls(auth=("-H", f"Authorization: Bearer {token}"))
        assert kind == "basic"
        return cls(auth=("--user", f"{device_id}:{token}"))

    def enroll(self, env: Env, body: Path, content_type: str = "application/pkcs10") -> Answer:
        return env.tools.est("simpleenroll", body, client=self.client, auth=self.auth, content_type=content_type)


# -- 1. enrollment, renewal and cacerts with curl ---------------------------------------------------------------


def test_device_enrolls_and_renews_with_curl(env: Env) -> None:
    tools = env.tools
    idevid = env.maker.idevid("boiler-1")
    csr = tools.csr("boiler-1")
    answer = tools.est("simpleenroll", csr.body, client=idevid)
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == CERTS_ONLY
    assert answer.headers["content-transfer-encoding"] == "base64"

    (cert,) = tools.certificates(answer)
    printed = describe(cert)
    assert "CN = boiler-1" in printed
    assert f"DNS:boiler-1.{FLEET}" in printed
    assert public_key(cert) == public_key(csr.key, private=True)
    code, output = tools.verify(cert)
    assert code == 0, output
    assert f"{cert}: OK" in output
    first = serial_of(cert)
    assert [(c["serial"], c["status"]) for c in tools.certificates_of("boiler-1")] == [(first, "good")]

    # Renewal: the operational certificate and its key are the TLS client certificate; the new CSR has a new key.
    renewal = tools.csr("boiler-1")
    answer = tools.est("simplereenroll", renewal.body, client=(cert, csr.key))
    assert answer.status == 200, answer
    (renewed,) = tools.certificates(answer)
    assert serial_of(renewed) != first
    assert "CN = boiler-1" in describe(renewed)
    assert public_key(renewed) == public_key(renewal.key, private=True)
    code, output = tools.verify(renewed)
    assert code == 0, output
    assert sorted(c["serial"] for c in tools.certificates_of("boiler-1")) == sorted([first, serial_of(renewed)])


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_token_enrollment_with_curl(env: Env, scheme: str) -> None:
    tools = env.tools
    device_id = f"meter-{scheme}"
    credentials = Credentials.of(env, device_id, scheme)
    assert tools.state(device_id) == "pending"
    answer = credentials.enroll(env, tools.csr(device_id).body)
    assert answer.status == 200, answer
    (cert,) = tools.certificates(answer)
    assert "CN = " + device_id in describe(cert)
    assert tools.verify(cert)[0] == 0
    assert tools.state(device_id) == "active"
    (enrollment,) = tools.enrollments_of(device_id)
    assert enrollment["status"] == "used"

    # The token is single use: a second enrollment with it is refused, and audited with the reason.
    seq = tools.audit_seq()
    again = credentials.enroll(env, tools.csr(device_id).body)
    assert again.status == 403, again
    assert "token is not valid" in again.text
    (record,) = tools.denied(seq, "enrollment.enroll", f"device:{device_id}")
    assert record["details"]["why"] == "token used"
    assert len(tools.certificates_of(device_id)) == 1


def test_cacerts_with_curl(env: Env) -> None:
    answer = env.tools.curl("/.well-known/est/cacerts")
    assert answer.status == 200, answer
    assert answer.headers["content-type"].startswith("application/pkcs7-mime")
    certificates = env.tools.certificates(answer)
    assert len(certificates) == 2
    fingerprints = {openssl("x509", "-in", str(p), "-noout", "-fingerprint", "-sha256").stdout for p in certificates}
    expected = {
        openssl("x509", "-in", str(p), "-noout", "-fingerprint", "-sha256").stdout
        for p in (env.hub.root_path, env.tools.issuing)
    }
    assert fingerprints == expected


# -- 2. OCSP and the CRL with openssl ----------------------------------------------------------------------------


def ocsp_status(env: Env, cert: Path) -> str:
    """``openssl ocsp`` over HTTPS to the hub (POST); the status line for ``cert``."""
    proc = openssl(
        *("ocsp", "-sha256", "-issuer", str(env.tools.issuing), "-cert", str(cert)),
        *("-url", f"https://127.0.0.1:{env.hub.port}/pki/ocsp", "-header", f"Host={HUB_NAME}:{env.hub.port}"),
        *("-CAfile", str(env.hub.root_path)),
        check=False,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, out + err
    assert "Response verify OK" in err, out + err
    return out


def fetch_crl(env: Env, *args: str) -> tuple[Answer, Path]:
    answer = env.tools.curl("/pki/crl", *args)
    pem = env.tools.path("crl", ".pem")
    if answer.status == 200:
        der = env.tools.path("crl", ".der")
        der.write_bytes(answer.body)
        openssl("crl", "-inform", "DER", "-in", str(der), "-out", str(pem))
    return answer, pem


def _openssl_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=dt.UTC)


@pytest.mark.slow
def test_ocsp_and_crl_follow_revocation(env: Env) -> None:
    tools = env.tools
    cert, _ = enroll(env, "valve-1")
    assert f"{cert}: good" in ocsp_status(env, cert)

    before, crl = fetch_crl(env)
    assert before.status == 200, before
    assert before.headers["content-type"] == "application/pkix-crl"
    for header in ("etag", "last-modified", "expires", "cache-control"):
        assert header in before.headers, before.headers
    # Cacheable until the CRL's nextUpdate, last modified at its thisUpdate (as openssl reads them).
    dates = dict(
        line.split("=", 1)
        for line in openssl("crl", "-in", str(crl), "-noout", "-lastupdate", "-nextupdate").stdout.decode().splitlines()
    )
    assert email.utils.parsedate_to_datetime(before.headers["expires"]) == _openssl_time(dates["nextUpdate"])
    assert email.utils.parsedate_to_datetime(before.headers["last-modified"]) == _openssl_time(dates["lastUpdate"])
    assert _openssl_time(dates["nextUpdate"]) > dt.datetime.now(dt.UTC)
    code, output = tools.verify(cert, "-crl_check", "-CRLfile", str(crl))
    assert code == 0, output
    not_modified, _ = fetch_crl(env, "-H", f"If-None-Match: {before.headers['etag']}")
    assert not_modified.status == 304
    assert not_modified.body == b""
    assert not_modified.headers["etag"] == before.headers["etag"]

    serial = serial_of(cert)
    env.hub.warden("cert", "revoke", serial, "--reason", "keyCompromise")
    status = ocsp_status(env, cert)
    assert f"{cert}: revoked" in status
    assert "Reason: keyCompromise" in status

    # The same over GET (RFC 5019, no nonce): openssl writes the request, curl fetches, openssl reads the response.
    request, response = tools.path("ocsp", ".req"), tools.path("ocsp", ".resp")
    openssl(
        *("ocsp", "-sha256", "-no_nonce", "-issuer", str(tools.issuing), "-cert", str(cert)),
        *("-reqout", str(request)),
    )
    answer = tools.curl("/pki/ocsp/" + quote(base64.b64encode(request.read_bytes()).decode()))
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/ocsp-response"
    response.write_bytes(answer.body)
    proc = openssl(
        *("ocsp", "-sha256", "-no_nonce", "-respin", str(response), "-CAfile", str(env.hub.root_path)),
        *("-issuer", str(tools.issuing), "-cert", str(cert), "-resp_text"),
    )
    assert f"{cert}: revoked" in proc.stdout.decode()
    assert "Response verify OK" in proc.stderr.decode()

    # The hub publishes a new CRL by itself (its leader checks every second) and serves it.
    after, crl = eventually(
        lambda: (r := fetch_crl(env))[0].headers.get("etag") != before.headers["etag"] and r,
        what="the new CRL is served",
    )
    assert after.status == 200, after
    code, output = tools.verify(cert, "-crl_check", "-CRLfile", str(crl))
    assert code != 0
    assert "certificate revoked" in output
    assert fetch_crl(env, "-H", f"If-None-Match: {before.headers['etag']}")[0].status == 200


# -- 5. bad input: refused, counted, nothing half-written --------------------------------------------------------


def _big_csr(tools: Interop, device_id: str) -> bytes:
    """A CSR of about 17 KB (over the 16 KiB CSR limit), in base64 on one line: a body of more than 22 KB that is
    still under the EST body limit, so the CSR limit itself refuses it."""
    filler = "x" * 16_800
    csr = tools.csr(device_id, "-addext", f"1.3.6.1.4.1.55555.1=ASN1:UTF8String:{filler}")
    return openssl("base64", "-A", "-in", str(csr.der)).stdout


def _bad_body(env: Env, case: str, device_id: str) -> bytes:
    tools = env.tools
    good = tools.csr(device_id)
    der = good.der.read_bytes()
    if case == "garbage":
        return b"this is not a CSR!\n"
    if case == "garbage-base64":
        return base64.encodebytes(b"\x30\x82\x01\x00" + b"\x00" * 300)
    if case == "truncated":
        return base64.encodebytes(der[: len(der) // 2])
    if case == "empty":
        return b"\n"
    if case == "oversized-csr":
        body = _big_csr(tools, device_id)
        assert 22 * 1024 < len(body) < 23_300
        return body
    if case == "oversized-body":
        return b"A" * 30_000
    if case == "wrong-content-type":
        return good.body.read_bytes()
    if case == "pkcs7":
        cacerts = tools.curl("/.well-known/est/cacerts")
        assert cacerts.status == 200
        return cacerts.body
    raise AssertionError(case)


BAD_BODIES = {
    "garbage": "not base64",
    "garbage-base64": "could not be parsed",
    "truncated": "could not be parsed",
    "empty": "empty",
    "oversized-csr": "more than the limit of 16384",
    "oversized-body": "larger than 23300 bytes",
    "pkcs7": "could not be parsed",
    "wrong-content-type": "application/pkcs10",
}


@pytest.mark.parametrize("auth", ["idevid", "bearer"])
@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_csr_body_is_refused_and_writes_nothing(env: Env, case: str, auth: str) -> None:
    tools = env.tools
    device_id = f"bad-{case}-{auth}"
    credentials = Credentials.of(env, device_id, auth)
    body = tools.path(case, ".b64")
    body.write_bytes(_bad_body(env, case, device_id))
    counted = tools.metric("warden_http_requests_total", route="/.well-known/est/simpleenroll", status="400")
    seq = tools.audit_seq()

    answer = credentials.enroll(env, body, "text/plain" if case == "wrong-content-type" else "application/pkcs10")
    assert answer.status == 400, answer
    assert BAD_BODIES[case] in answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert tools.metric("warden_http_requests_total", route="/.well-known/est/simpleenroll", status="400") > counted

    # Nothing half-written: no certificate, no device registered (IDevID) or still pending (token), the token still
    # active, and no audit record of a success.
    assert tools.certificates_of(device_id) == []
    if auth == "idevid":
        assert tools.state(device_id) is None
    else:
        assert tools.state(device_id) == "pending"
        assert [e["status"] for e in tools.enrollments_of(device_id)] == ["active"]
    assert [r for r in tools.audit_about(seq, device_id) if r["outcome"] != "denied"] == []
    # ... and the refusal itself is in the audit log, with its reason.
    refusals = [
        r
        for r in tools.audit_after(seq)
        if r["outcome"] == "denied" and r["action"] == "enrollment.enroll" and r["details"].get("reason")
    ]
    assert refusals, "a refused enrollment must leave a denied audit record"

    # The same credential still onboards the device.
    answer = credentials.enroll(env, tools.csr(device_id).body)
    assert answer.status == 200, answer
    assert tools.state(device_id) == "active"


def test_body_over_the_request_limit_is_413(env: Env) -> None:
    tools = env.tools
    idevid = env.maker.idevid("huge-1")
    body = tools.path("huge", ".b64")
    body.write_bytes(b"A" * (4 * 1024 * 1024 + 1))
    seq = tools.audit_seq()
    answer = tools.est("simpleenroll", body, client=idevid)
    assert answer.status == 413, answer
    assert "too large" in answer.text
    assert tools.state("huge-1") is None
    assert [r for r in tools.audit_about(seq, "huge-1") if r["outcome"] != "denied"] == []


def _refused_certificate(env: Env, kind: str) -> tuple[Issued, str]:
    """A client certificate the listener must refuse, and the TLS alert the hub sends for it."""
    work = env.tools.work / kind
    now = dt.datetime.now(dt.UTC)
    if kind == "expired-idevid":
        old = env.maker.idevid(
            "expired-1", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )
        return old, "certificate_expired"
    if kind == "self-signed":
        return self_signed(work, "selfie-1"), "unknown_ca"
    if kind == "unknown-ca":
        return ManufacturerCA(work, name="Other Vendor CA").idevid("other-1"), "unknown_ca"
    if kind == "spoofed-ca":
        # Same name as the trusted manufacturer CA, another key.
        return ManufacturerCA(work, name=env.maker.name).idevid("spoof-1"), "unknown_ca"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["expired-idevid", "self-signed", "unknown-ca", "spoofed-ca"])
def test_untrusted_client_certificate_is_refused_in_the_handshake(env: Env, kind: str) -> None:
    tools = env.tools
    certificate, alert = _refused_certificate(env, kind)
    device_id = certificate.certificate.subject.rfc4514_string().removeprefix("CN=")
    before = tools.handshake_failures(alert)
    seq = tools.audit_seq()
    answer = tools.est("simpleenroll", tools.csr(device_id).body, client=certificate)
    assert answer.rc in HANDSHAKE_REFUSED, answer
    assert answer.status == 0
    eventually(lambda: tools.handshake_failures(alert) > before, what=f"{alert} counted")
    assert tools.state(device_id) is None
    assert tools.audit_about(seq, device_id) == []


def test_each_endpoint_wants_its_own_credential(env: Env) -> None:
    tools = env.tools
    idevid = env.maker.idevid("lamp-1")
    cert, csr = enroll(env, "lamp-1", idevid)
    seq = tools.audit_seq()

    # No credential at all: 401 with a challenge.
    anonymous = tools.est("simpleenroll", tools.csr("lamp-1").body)
    assert anonymous.status == 401, anonymous
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    # The operational certificate does not onboard, the onboarding certificate does not renew: 403, audited.
    onboarding = tools.est("simpleenroll", tools.csr("lamp-1").body, client=(cert, csr.key))
    assert onboarding.status == 403, onboarding
    assert "renews with simplereenroll" in onboarding.text
    renewal = tools.est("simplereenroll", tools.csr("lamp-1").body, client=idevid)
    assert renewal.status == 403, renewal
    assert "needs an operational certificate" in renewal.text
    reasons = {(r["action"], r["details"]["reason"]) for r in tools.audit_after(seq) if r["outcome"] == "denied"}
    assert ("enrollment.enroll", "an operational certificate renews with simplereenroll") in reasons
    assert (
        "enrollment.reenroll",
        "renewal needs an operational certificate of this hub; onboard with simpleenroll",
    ) in reasons
    assert [c["serial"] for c in tools.certificates_of("lamp-1")] == [serial_of(cert)]


def test_revoked_certificate_cannot_renew(env: Env) -> None:
    tools = env.tools
    cert, csr = enroll(env, "pump-1")
    env.hub.warden("cert", "revoke", serial_of(cert), "--reason", "keyCompromise")
    seq = tools.audit_seq()
    # The TLS layer does not check revocation (ADR 0004): the handshake completes, the application refuses.
    answer = tools.est("simplereenroll", tools.csr("pump-1").body, client=(cert, csr.key))
    assert answer.status == 403, answer
    assert "revoked (keyCompromise)" in answer.text
    (record,) = tools.denied(seq, "enrollment.reenroll", "device:pump-1")
    assert "revoked" in record["details"]["reason"]
    assert [c["status"] for c in tools.certificates_of("pump-1")] == ["revoked"]


@pytest.mark.slow
def test_cloned_onboarding_certificate_is_refused_until_rearmed(env: Env) -> None:
    tools, hub = env.tools, env.hub
    genuine = env.maker.idevid("sensor-1")
    first, first_csr = enroll(env, "sensor-1", genuine)

    # The same IDevID again (a clone of the whole device, or a replay): the device is enrolled already.
    seq = tools.audit_seq()
    again = tools.est("simpleenroll", tools.csr("sensor-1").body, client=genuine)
    assert again.status == 403, again
    assert "enrolled already" in again.text
    assert len(tools.denied(seq, "enrollment.enroll", "device:sensor-1")) == 1

    # Another IDevID from the group's CA naming the same device: a security event.
    clone = env.maker.idevid("sensor-1", name="idevid-sensor-1-clone")
    seq = tools.audit_seq()
    answer = tools.est("simpleenroll", tools.csr("sensor-1").body, client=clone)
    assert answer.status == 403, answer
    assert "bound to another onboarding identity" in answer.text
    (event,) = tools.denied(seq, "onboarding-identity-conflict", "device:sensor-1")
    assert event["details"]["presented"] != event["details"]["expected"]
    assert len(tools.denied(seq, "enrollment.enroll", "device:sensor-1")) == 1
    assert [c["serial"] for c in tools.certificates_of("sensor-1")] == [serial_of(first)]

    # Re-armed: the genuine IDevID onboards once more (the clone still not), and the earlier certificate is revoked.
    hub.warden("enrollment", "rearm", "sensor-1", "--reason", "operational key lost")
    assert tools.est("simpleenroll", tools.csr("sensor-1").body, client=clone).status == 403
    second, second_csr = enroll(env, "sensor-1", genuine)
    listed = {c["serial"]: c for c in json.loads(hub.warden("cert", "list", "--device", "sensor-1", "--json").stdout)}
    assert listed[serial_of(first)]["status"] == "revoked"
    assert listed[serial_of(first)]["revocation_reason"] == "superseded"
    assert listed[serial_of(second)]["status"] == "good"
    assert len(listed) == 2
    # Once: a third onboarding needs another re-arming, and the superseded certificate no longer renews.
    assert tools.est("simpleenroll", tools.csr("sensor-1").body, client=genuine).status == 403
    renewal = tools.est("simplereenroll", tools.csr("sensor-1").body, client=(first, first_csr.key))
    assert renewal.status == 403, renewal
    assert "revoked (superseded)" in renewal.text
    assert tools.est("simplereenroll", tools.csr("sensor-1").body, client=(second, second_csr.key)).status == 200


# -- 6. a CSR naming another device ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["idevid", "basic"])
@pytest.mark.parametrize("naming", ["cn", "san"])
def test_csr_naming_another_device_is_refused_and_audited(env: Env, naming: str, auth: str) -> None:
    tools = env.tools
    device_id, other = f"cam-{naming}-{auth}", f"cam-{naming}-{auth}-x"
    credentials = Credentials.of(env, device_id, auth)
    if naming == "cn":
        csr, reason = tools.csr(other), f"the CSR's subject names '{other}'; it must be CN={device_id}"
    else:
        csr = tools.csr(device_id, "-addext", f"subjectAltName=DNS:{other}.{FLEET}")
        reason = f"the CSR asks for the DNS name '{other}.{FLEET}'"
    seq = tools.audit_seq()
    answer = credentials.enroll(env, csr.body)
    assert answer.status == 403, answer
    assert reason in answer.text
    (record,) = tools.denied(seq, "enrollment.enroll", f"device:{device_id}")
    assert reason in record["details"]["reason"]
    assert tools.certificates_of(device_id) == []
    assert tools.state(other) is None
    if auth == "basic":
        assert [e["status"] for e in tools.enrollments_of(device_id)] == ["active"]
    else:
        assert tools.state(device_id) is None
    assert credentials.enroll(env, tools.csr(device_id).body).status == 200

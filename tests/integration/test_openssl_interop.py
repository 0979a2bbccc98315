"""openssl (a tool we did not write) against Warden's PKI, end to end through the CLI: CSRs made by ``openssl req``
are signed (or refused), certificates verify with ``openssl verify``, revocation shows in CRLs (``-crl_check``) and
OCSP responses (``openssl ocsp``, SHA-1 and SHA-256 CertIDs, with and without nonce), and whatever a CSR asks for
beyond its key is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import Cli, openssl
from warden.registry import format_serial

FLEET = "fleet.acme.test"

#: ``openssl req -newkey`` arguments per key kind
NEWKEY = {
    "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "ed25519": ["-newkey", "ed25519"],
    "rsa2048": ["-newkey", "rsa:2048"],
    "rsa1024": ["-newkey", "rsa:1024"],
    "p521": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
    "secp256k1": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
    "ed448": ["-newkey", "ed448"],
}


def openssl_csr(tmp_path: Path, label: str, kind: str, *extra: str, subject: str = "/CN=requested-name") -> Path:
    """A CSR (and its key, ``<label>.key``) made by ``openssl req -new -newkey``."""
    csr, key = tmp_path / f"{label}.csr", tmp_path / f"{label}.key"
    openssl("req", "-new", *NEWKEY[kind], "-nodes", "-keyout", str(key), "-subj", subject, "-out", str(csr), *extra)
    assert b"BEGIN CERTIFICATE REQUEST" in csr.read_bytes()
    return csr


def ca(cli: Cli, name: str) -> str:
    path = cli.data_dir / "ca" / name
    assert path.is_file(), f"{path} is missing after init"
    return str(path)


def sign_device(cli: Cli, tmp_path: Path, device_id: str, kind: str = "p256", profile: str = "device") -> Path:
    csr = openssl_csr(tmp_path, device_id, kind)
    out = tmp_path / f"{device_id}.pem"
    cli.ok("device", "add", device_id)
    cli.ok("cert", "sign", "--device", device_id, "--profile", profile, "--csr", csr, "--out", out)
    return out


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def verify(cli: Cli, cert: Path, *args: str) -> tuple[int, str]:
    """``openssl verify`` against the exported chain; (exit status, stdout + stderr)."""
    proc = openssl("verify", "-CAfile", ca(cli, "chain.pem"), *args, str(cert), check=False)
    return proc.returncode, (proc.stdout + proc.stderr).decode()


# -- openssl-made CSRs are signed and verify ------------------------------------------------------------------------

PURPOSE = {"device": "sslclient", "gateway": "sslclient", "service": "sslserver", "hub-client": "sslclient"}
ACCEPTED = [
    pytest.param(kind, profile, id=f"{kind}-{profile}")
    for kind in ("p256", "p384", "ed25519", "rsa2048")
    for profile in ("device", "service")
]


@pytest.mark.parametrize(("kind", "profile"), ACCEPTED)
def test_openssl_csr_is_signed_and_verifies(initialised_cli: Cli, tmp_path: Path, kind: str, profile: str) -> None:
    cli = initialised_cli
    out = tmp_path / "issued.pem"
    if profile == "service":
        csr = openssl_csr(tmp_path, "svc", kind)
        cli.ok("cert", "sign", "--name", f"mqtt.{FLEET}", "--profile", profile, "--csr", csr, "--out", out)
        key = tmp_path / "svc.key"
    else:
        out = sign_device(cli, tmp_path, "sensor-1", kind, profile)
        key = tmp_path / "sensor-1.key"

    # The certificate carries the key openssl generated.
    cert_pub = openssl("x509", "-in", str(out), "-noout", "-pubkey").stdout
    key_pub = openssl("pkey", "-in", str(key), "-pubout").stdout
    assert cert_pub == key_pub

    code, text = verify(cli, out, "-x509_strict", "-purpose", PURPOSE[profile])
    assert code == 0, text
    assert text.strip() == f"{out}: OK"
    # Only the root as trust anchor, the issuing CA as an untrusted intermediate: the same answer.
    proc = openssl(
        "verify", "-x509_strict", "-CAfile", ca(cli, "root-ca.pem"), "-untrusted", ca(cli, "issuing-ca.pem"), str(out)
    )
    assert proc.stdout.decode().strip() == f"{out}: OK"
    # Without the issuing CA there is no path: the checks above do discriminate.
    missing = openssl("verify", "-CAfile", ca(cli, "root-ca.pem"), str(out), check=False)
    assert missing.returncode != 0
    assert b"unable to get local issuer certificate" in missing.stdout + missing.stderr


# -- refused keys ---------------------------------------------------------------------------------------------------

REFUSED = [
    pytest.param("rsa1024", (), "RSA key has 1024 bits", id="rsa1024"),
    pytest.param("p521", (), "unsupported curve secp521r1", id="p521"),
    pytest.param("secp256k1", (), "unsupported curve secp256k1", id="secp256k1"),
    pytest.param("ed448", (), "Ed448", id="ed448"),
    pytest.param("rsa2048", ("-sha1",), "signed with sha1", id="rsa2048-sha1-signature"),
]


@pytest.mark.parametrize(("kind", "extra", "message"), REFUSED)
def test_unsupported_csr_is_refused_without_trace(
    initialised_cli: Cli, tmp_path: Path, kind: str, extra: tuple[str, ...], message: str
) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "weak-1")
    csr = openssl_csr(tmp_path, "weak", kind, *extra)
    records_before = json.loads(cli.ok("cert", "list", "--json"))
    audit_before = json.loads(cli.ok("audit", "list", "--json"))
    out = tmp_path / "weak.pem"

    result = cli("cert", "sign", "--device", "weak-1", "--csr", csr, "--out", out)

    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.err
    assert result.out == ""
    assert not out.exists()
    assert list(tmp_path.glob("weak.pem*")) == []  # no temporary file left behind either
    records = json.loads(cli.ok("cert", "list", "--json"))
    assert records == records_before
    assert not [r for r in records if r["device_id"] == "weak-1"]
    audit = json.loads(cli.ok("audit", "list", "--json"))
    assert not [
        r
        for r in audit
        if r["action"].startswith("certificate.") and r["target"] == "device:weak-1" and r["outcome"] == "success"
    ]
    assert len(audit) - len(audit_before) <= 1  # at most a record of the refusal itself
    device = json.loads(cli.ok("device", "show", "weak-1", "--json"))
    assert device["state"] == "pending"
    assert device["certificates"] == []
    cli.ok("audit", "verify")


# -- CRLs -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["keyCompromise", "unspecified", "superseded"])
def test_crl_check_rejects_a_revoked_certificate(initialised_cli: Cli, tmp_path: Path, reason: str) -> None:
    cli = initialised_cli
    device = sign_device(cli, tmp_path, "sensor-1")
    other = sign_device(cli, tmp_path, "sensor-2")
    before = tmp_path / "before.crl"
    cli.ok("crl", "--out", before)

    code, text = verify(cli, device, "-crl_check", "-CRLfile", str(before))
    assert code == 0, text
    assert text.strip() == f"{device}: OK"

    cli.ok("cert", "revoke", f"{serial_of(device):X}", "--reason", reason)
    after = tmp_path / "after.crl"
    cli.ok("crl", "--out", after)

    code, text = verify(cli, device, "-crl_check", "-CRLfile", str(after))
    assert code != 0
    assert "certificate revoked" in text
    # The revocation is of that one certificate only.
    code, text = verify(cli, other, "-crl_check", "-CRLfile", str(after))
    assert code == 0, text
    # The old CRL does not know about it yet (and openssl accepts it: CRLs are snapshots).
    code, _ = verify(cli, device, "-crl_check", "-CRLfile", str(before))
    assert code == 0


def test_der_crl_parses_and_verifies_with_openssl(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    revoked = {
        "keyCompromise": sign_device(cli, tmp_path, "sensor-1"),
        "unspecified": sign_device(cli, tmp_path, "sensor-2"),
    }
    for reason, cert in revoked.items():
        cli.ok("cert", "revoke", f"{serial_of(cert):X}", "--reason", reason)
    der = tmp_path / "crl.der"
    cli.ok("crl", "--der", "--out", der)
    assert der.read_bytes()[:1] == b"\x30"  # DER SEQUENCE, not PEM

    proc = openssl("crl", "-inform", "DER", "-in", str(der), "-noout", "-text", "-CAfile", ca(cli, "chain.pem"))
    text = proc.stdout.decode()
    assert "verify OK" in proc.stderr.decode()
    for cert in revoked.values():
        assert f"Serial Number: {format_serial(serial_of(cert))}" in text
    assert text.count("Key Compromise") == 1
    assert "X509v3 CRL Number" in text
    assert "Issuer: O = Acme Test, CN = Acme Test Warden Issuing CA" in text
    # Converted to PEM by openssl, the same CRL serves -crl_check.
    pem = tmp_path / "crl.pem"
    openssl("crl", "-inform", "DER", "-in", str(der), "-outform", "PEM", "-out", str(pem))
    code, text = verify(cli, revoked["keyCompromise"], "-crl_check", "-CRLfile", str(pem))
    assert code != 0 and "certificate revoked" in text


# -- OCSP ---------------------------------------------------------------------------------------------------------

OCSP_CASES = [
    pytest.param(digest, nonce, id=f"{digest}-{'nonce' if nonce else 'no-nonce'}")
    for digest in ("sha1", "sha256")
    for nonce in (True, False)
]


class Ocsp:
    """Requests made by ``openssl ocsp``, answered by ``warden ocsp respond``, verified by ``openssl ocsp``."""

    def __init__(self, cli: Cli, tmp_path: Path, digest: str, nonce: bool) -> None:
        self.cli, self.tmp, self.digest, self.nonce = cli, tmp_path, digest, nonce
        self.issuer = ca(cli, "issuing-ca.pem")
        self.trust = ["-VAfile", ca(cli, "ocsp-signer.pem"), "-CAfile", ca(cli, "chain.pem")]
        self.count = 0

    def target(self, subject: Path | str) -> list[str]:
        # The digest option must come BEFORE -cert/-serial, or the CertID is made with SHA-1 regardless.
        what = ["-cert", str(subject)] if isinstance(subject, Path) else ["-serial", subject]
        return ["-issuer", self.issuer, f"-{self.digest}", *what]

    def ask(self, subject: Path | str) -> tuple[Path, Path]:
        self.count += 1
        request, response = self.tmp / f"req{self.count}.der", self.tmp / f"resp{self.count}.der"
        nonce = [] if self.nonce else ["-no_nonce"]
        openssl("ocsp", *self.target(subject), *nonce, "-reqout", str(request))
        self.cli.ok("ocsp", "respond", "--request", request, "--out", response)
        return request, response

    def verify_with_request(self, request: Path, response: Path) -> str:
        """Signature, responder and (with -reqin) nonce checked; returns the response as text."""
        proc = openssl(
            "ocsp", "-respin", str(response), "-reqin", str(request), "-issuer", self.issuer, *self.trust,
            "-resp_text", check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        assert "Response verify OK" in proc.stderr.decode()
        text = proc.stdout.decode()
        assert f"Hash Algorithm: {self.digest}" in text
        assert ("OCSP Nonce" in text) is self.nonce
        # Trusting only the root, without -VAfile: openssl then checks the delegation itself (the signer is issued
        # by the certificate's issuer and has id-kp-OCSPSigning) from the certificate included in the response.
        proc = openssl(
            "ocsp", "-respin", str(response), "-reqin", str(request), "-issuer", self.issuer,
            "-CAfile", ca(self.cli, "root-ca.pem"), check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        assert "Response verify OK" in proc.stderr.decode()
        return text

    def summary(self, response: Path, subject: Path | str) -> str:
        """openssl's status summary for ``subject``: it matches our CertID to one it builds itself."""
        proc = openssl("ocsp", "-respin", str(response), *self.target(subject), "-no_nonce", *self.trust, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
        assert "Response verify OK" in proc.stderr.decode()
        return proc.stdout.decode()


@pytest.mark.parametrize(("digest", "nonce"), OCSP_CASES)
def test_openssl_ocsp_good_revoked_unknown(initialised_cli: Cli, tmp_path: Path, digest: str, nonce: bool) -> None:
    cli = initialised_cli
    device = sign_device(cli, tmp_path, "sensor-1")
    o = Ocsp(cli, tmp_path, digest, nonce)

    request, response = o.ask(device)
    assert "Cert Status: good" in o.verify_with_request(request, response)
    assert o.summary(response, device).startswith(f"{device}: good\n")

    cli.ok("cert", "revoke", f"{serial_of(device):X}", "--reason", "keyCompromise")
    request, response = o.ask(device)
    text = o.verify_with_request(request, response)
    assert "Cert Status: revoked" in text
    assert "Revocation Reason: keyCompromise (0x1)" in text
    summary = o.summary(response, device)
    assert summary.startswith(f"{device}: revoked\n")
    assert "Reason: keyCompromise" in summary
    assert "Revocation Time:" in summary

    never_issued = "0x" + os.urandom(16).hex().upper()
    request, response = o.ask(never_issued)
    assert "Cert Status: unknown" in o.verify_with_request(request, response)
    assert o.summary(response, never_issued).startswith(f"{never_issued}: unknown\n")


def test_openssl_ocsp_rejects_a_mismatched_nonce_and_a_tampered_response(initialised_cli: Cli, tmp_path: Path) -> None:
    """Negative controls for the checks above: openssl does compare the nonce and the signature."""
    cli = initialised_cli
    device = sign_device(cli, tmp_path, "sensor-1")
    o = Ocsp(cli, tmp_path, "sha256", nonce=True)
    request, response = o.ask(device)
    other_request, _ = o.ask(device)  # another request, another nonce
    assert o.verify_with_request(request, response)

    proc = openssl(
        "ocsp", "-respin", str(response), "-reqin", str(other_request), "-issuer", o.issuer, *o.trust, check=False
    )
    assert proc.returncode != 0
    assert "Nonce Verify error" in proc.stderr.decode()

    data = bytearray(response.read_bytes())
    serial = serial_of(device).to_bytes(16, "big")
    index = bytes(data).index(serial)  # the CertID's serial, inside the signed responseData
    data[index + 15] ^= 0x01
    tampered = tmp_path / "tampered.der"
    tampered.write_bytes(bytes(data))
    proc = openssl("ocsp", "-respin", str(tampered), "-reqin", str(request), "-issuer", o.issuer, *o.trust, check=False)
    assert proc.returncode != 0
    assert "Response Verify Failure" in proc.stderr.decode()


# -- what a CSR asks for is ignored ---------------------------------------------------------------------------------

GREEDY_EXTENSIONS = [
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-addext", "extendedKeyUsage=serverAuth,codeSigning",
    "-addext",
    f"subjectAltName=DNS:evil.example.com,DNS:other-device.{FLEET},IP:10.0.0.1,email:a@evil.example.com",
]  # fmt: skip


@pytest.mark.parametrize("profile", ["device", "gateway", "service"])
def test_requested_ca_and_sans_are_ignored(initialised_cli: Cli, tmp_path: Path, profile: str) -> None:
    cli = initialised_cli
    csr = openssl_csr(tmp_path, "greedy", "p256", *GREEDY_EXTENSIONS, subject="/CN=evil.example.com/O=Evil Corp")
    requested = openssl("req", "-in", str(csr), "-noout", "-text").stdout.decode()
    assert "CA:TRUE" in requested and "DNS:evil.example.com" in requested  # the request did ask
    out = tmp_path / "greedy.pem"
    if profile == "service":
        common_name = f"mqtt.{FLEET}"
        cli.ok("cert", "sign", "--name", common_name, "--profile", profile, "--csr", csr, "--out", out)
        target = f"service:{common_name}"
    else:
        common_name = "sensor-7"
        cli.ok("device", "add", common_name)
        cli.ok("cert", "sign", "--device", common_name, "--profile", profile, "--csr", csr, "--out", out)
        target = f"device:{common_name}"
    san = f"{common_name}.{FLEET}" if profile != "service" else common_name

    text = openssl("x509", "-in", str(out), "-noout", "-text").stdout.decode()
    assert "CA:FALSE" in text and "CA:TRUE" not in text
    assert f"DNS:{san}\n" in text
    for unwanted in ("evil", "other-device", "IP Address", "email:", "Certificate Sign", "Code Signing", "Evil Corp"):
        assert unwanted not in text
    subject = openssl("x509", "-in", str(out), "-noout", "-subject", "-nameopt", "RFC2253").stdout.decode()
    assert subject.strip() == f"subject=CN={common_name},O=Acme Test"

    cert = x509.load_pem_x509_certificate(out.read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False and constraints.value.path_length is None
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.DNSName(san)]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [common_name]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.SERVER_AUTH if profile == "service" else ExtendedKeyUsageOID.CLIENT_AUTH]

    # What was ignored is on the audit record of the issuance.
    audit = json.loads(cli.ok("audit", "list", "--json"))
    issued = [r for r in audit if r["action"] == "certificate.issue" and r["target"] == target]
    assert len(issued) == 1
    assert {"CA:TRUE", "subjectAltName"} <= set(issued[0]["details"]["ignored_from_csr"])

    # And openssl will not accept the certificate as a CA: a certificate "issued" with its key does not verify.
    sub_csr = openssl_csr(tmp_path, "sub", "p256", subject="/CN=sub")
    sub = tmp_path / "sub.pem"
    openssl(
        "x509", "-req", "-in", str(sub_csr), "-CA", str(out), "-CAkey", str(tmp_path / "greedy.key"),
        "-set_serial", "1", "-days", "1", "-out", str(sub),
    )  # fmt: skip
    code, text = verify(cli, sub, "-untrusted", str(out))
    assert code != 0
    assert "invalid CA certificate" in text

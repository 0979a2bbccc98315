"""pkilint (a linter we did not write) on everything Warden signs: a certificate of every profile for every subject key
type that profile takes, with and without ``public_url`` (CRL distribution point and OCSP AIA), the root and issuing CA
certificates, CRLs (with entries of every reason, and empty) and OCSP responses (good, revoked, unknown, refused).

The linters run as subprocesses (``lint_pkix_cert``, ``lint_crl``, ``lint_ocsp_response``,
``lint_pkix_signer_signee_cert_chain`` from the venv) and report JSON; no finding at WARNING severity or above is
allowed. NOTICE and INFO findings (e.g. "the SKI was made with method 1") are fine and ignored.

To keep this file fast, the data directories for the leaf-certificate tests are made once per module, one per
(CA key algorithm, public URL); every test signs its own certificate in the one it needs. Tests that must know exactly
what the CA has revoked (CRLs) initialise their own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from tests.conftest import Cli, make_csr
from warden.cli import run

ORG = "Acme Test"
FLEET = "fleet.acme.test"
PUBLIC_URL = "https://hub.fleet.acme.test"
BIN = Path(sys.executable).parent
#: pkilint severities that fail a test; NOTICE and INFO are informational
BLOCKING = frozenset({"FATAL", "ERROR", "WARNING"})


# -- running pkilint --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    code: str
    node_path: str
    message: str | None

    def __str__(self) -> str:
        return f"{self.severity} {self.code} at {self.node_path}" + (f": {self.message}" if self.message else "")


def pkilint(tool: str, *args: str | Path) -> list[Finding]:
    """Run one pkilint CLI with JSON output, every finding from INFO up; return the findings."""
    executable = BIN / tool
    assert executable.exists(), f"{executable} is missing: is pkilint installed in the venv?"
    proc = subprocess.run(
        [str(executable), "lint", "-f", "JSON", "-s", "INFO", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.stdout.strip(), f"{tool} produced no report (exit {proc.returncode}): {proc.stderr.strip()}"
    report = json.loads(proc.stdout)
    findings = [
        Finding(d["severity"], d["code"], r["node_path"], d.get("message"))
        for r in report["results"]
        for d in r["finding_descriptions"]
    ]
    # pkilint's exit status is the number of findings at or above the threshold: a cross-check of the parsing.
    assert proc.returncode == min(len(findings), 255), (proc.returncode, findings, proc.stderr)
    return findings


def assert_clean(findings: list[Finding], *, allowed: dict[str, str] | None = None) -> None:
    """No finding at WARNING or above, except codes in ``allowed`` (code -> why the finding is wrong for us)."""
    allowed = allowed or {}
    blocking = [f for f in findings if f.severity in BLOCKING and f.code not in allowed]
    assert not blocking, "pkilint findings:\n" + "\n".join(map(str, blocking))


def lint_cert(path: Path) -> list[Finding]:
    return pkilint("lint_pkix_cert", path)


def lint_crl(path: Path) -> list[Finding]:
    return pkilint("lint_crl", "-t", "CRL", "-p", "PKIX", path)


def lint_ocsp(path: Path) -> list[Finding]:
    return pkilint("lint_ocsp_response", path)


def lint_chain(issuer: Path, subject: Path) -> list[Finding]:
    return pkilint("lint_pkix_signer_signee_cert_chain", issuer, subject)


# -- data directories -------------------------------------------------------------------------------------------


def _set_public_url(mp: pytest.MonkeyPatch, url: str | None) -> None:
    if url:
        mp.setenv("WARDEN_PUBLIC_URL", url)
    else:
        mp.delenv("WARDEN_PUBLIC_URL", raising=False)


def _init(data_dir: Path, algorithm: str, public_url: str | None) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        _set_public_url(mp, public_url)
        argv = ["--data-dir", str(data_dir), "init", "--org", ORG, "--fleet-domain", FLEET]
        code = run([*argv, "--key-algorithm", algorithm])
    assert code == 0, f"warden init ({algorithm}, {public_url}) failed with {code}"
    return data_dir


@pytest.fixture(autouse=True)
def _no_stray_public_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test states the public URL it wants; one from the developer's shell must not leak in."""
    monkeypatch.delenv("WARDEN_PUBLIC_URL", raising=False)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str | None], Path]:
    """(CA key algorithm, public URL) -> an initialised data directory shared by this module's tests."""
    made: dict[tuple[str, str | None], Path] = {}

    def get(algorithm: str, public_url: str | None) -> Path:
        key = (algorithm, public_url)
        if key not in made:
            made[key] = _init(tmp_path_factory.mktemp(f"pkilint-{algorithm}") / "data", algorithm, public_url)
        return made[key]

    return get


@pytest.fixture
def hub(
    data_dirs: Callable[[str, str | None], Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[[str, str | None], Cli]:
    """A CLI on the shared data directory for (algorithm, public URL), with WARDEN_PUBLIC_URL set to match."""

    def open_cli(algorithm: str, public_url: str | None) -> Cli:
        _set_public_url(monkeypatch, public_url)
        return Cli(capsys, data_dirs(algorithm, public_url))

    return open_cli


@pytest.fixture
def fresh(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Cli]:
    """A CLI on a new data directory of its own (for CRLs, whose content depends on everything revoked)."""
    monkeypatch.delenv("WARDEN_PUBLIC_URL", raising=False)

    def init(algorithm: str) -> Cli:
        cli.ok("init", "--org", ORG, "--fleet-domain", FLEET, "--key-algorithm", algorithm)
        return cli

    return init


def ca_file(cli: Cli, name: str) -> Path:
    path = cli.data_dir / "ca" / name
    assert path.is_file(), f"{path} is missing after init"
    return path


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def issue(cli: Cli, tmp_path: Path, profile: str, key: str, label: str) -> tuple[Path, dict[str, object]]:
    """Sign a fresh CSR of ``key`` kind with ``profile`` through the CLI; return the PEM file and the JSON record."""
    csr = tmp_path / f"{label}.csr"
    csr.write_bytes(make_csr(key))
    out = tmp_path / f"{label}.pem"
    if profile in ("device", "gateway"):
        cli.ok("device", "add", label)
        record = json.loads(
            cli.ok("cert", "sign", "--device", label, "--profile", profile, "--csr", csr, "--out", out, "--json")
        )
    else:
        name = f"{label}.services.{FLEET}"
        record = json.loads(
            cli.ok("cert", "sign", "--name", name, "--profile", profile, "--csr", csr, "--out", out, "--json")
        )
    assert out.is_file()
    return out, record


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def assert_revocation_pointers(cert: x509.Certificate, public_url: str | None) -> None:
    """CDP and OCSP AIA are present exactly when a public URL is configured (so both variants lint what they claim)."""
    cdp = _ext(cert, x509.CRLDistributionPoints)
    aia = _ext(cert, x509.AuthorityInformationAccess)
    if public_url is None:
        assert cdp is None and aia is None
        return
    assert isinstance(cdp, x509.CRLDistributionPoints) and isinstance(aia, x509.AuthorityInformationAccess)
    assert [n.value for p in cdp for n in p.full_name or []] == [f"{public_url}/pki/crl"]
    assert [(a.access_method, a.access_location.value) for a in aia] == [
        (AuthorityInformationAccessOID.OCSP, f"{public_url}/pki/ocsp")
    ]


# -- negative control: the harness does see problems --------------------------------------------------------------


def test_harness_reports_errors_in_a_bad_certificate(tmp_path: Path) -> None:
    """A certificate with known defects (DNS SAN 'localhost', keyCertSign without cA, no SKI/AKI) must come out
    with findings at ERROR: otherwise a clean report below would mean nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, False, False, False),  # keyCertSign, not a CA
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "bad.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    findings = lint_cert(path)
    assert any(f.severity == "ERROR" for f in findings), findings
    with pytest.raises(AssertionError, match="pkilint findings"):
        assert_clean(findings)


# -- end-entity certificates --------------------------------------------------------------------------------------

LEAF_PROFILES = ("device", "gateway", "service", "hub-client")
SUBJECT_KEYS = ("p256", "p384", "ed25519", "rsa2048")
URLS = {"no-url": None, "public-url": PUBLIC_URL}
EKU = {
    "device": ExtendedKeyUsageOID.CLIENT_AUTH,
    "gateway": ExtendedKeyUsageOID.CLIENT_AUTH,
    "service": ExtendedKeyUsageOID.SERVER_AUTH,
    "hub-client": ExtendedKeyUsageOID.CLIENT_AUTH,
}

LEAF_CASES = [
    pytest.param("P-256", profile, key, url, id=f"ca-p256-{profile}-{key}-{url_id}")
    for profile in LEAF_PROFILES
    for key in SUBJECT_KEYS
    for url_id, url in URLS.items()
] + [
    # A P-384 issuing CA signs with ecdsa-with-SHA384: one certificate of each profile under it.
    pytest.param("P-384", profile, "p384", url, id=f"ca-p384-{profile}-p384-{url_id}")
    for profile in LEAF_PROFILES
    for url_id, url in URLS.items()
]


@pytest.mark.parametrize(("ca_algorithm", "profile", "key", "public_url"), LEAF_CASES)
def test_end_entity_certificate_is_clean(
    hub: Callable[[str, str | None], Cli],
    tmp_path: Path,
    ca_algorithm: str,
    profile: str,
    key: str,
    public_url: str | None,
) -> None:
    cli = hub(ca_algorithm, public_url)
    path, record = issue(cli, tmp_path, profile, key, f"{profile}-{key}")
    assert record["profile"] == profile
    cert = load_cert(path)
    assert_revocation_pointers(cert, public_url)
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert isinstance(eku, x509.ExtendedKeyUsage) and list(eku) == [EKU[profile]]
    expected_hash = hashes.SHA384 if ca_algorithm == "P-384" else hashes.SHA256
    assert isinstance(cert.signature_hash_algorithm, expected_hash)

    assert_clean(lint_cert(path))


@pytest.mark.parametrize("public_url", URLS.values(), ids=URLS.keys())
@pytest.mark.parametrize("ca_algorithm", ["P-256", "P-384"])
def test_ocsp_signer_certificate_is_clean(
    hub: Callable[[str, str | None], Cli], ca_algorithm: str, public_url: str | None
) -> None:
    """The delegated OCSP responder certificate issued at init (its key follows --key-algorithm)."""
    cli = hub(ca_algorithm, public_url)
    path = ca_file(cli, "ocsp-signer.pem")
    cert = load_cert(path)
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert isinstance(eku, x509.ExtendedKeyUsage) and list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert isinstance(_ext(cert, x509.OCSPNoCheck), x509.OCSPNoCheck)
    # id-pkix-ocsp-nocheck: the responder's own status is not checked, so it carries no pointers to check it with.
    assert_revocation_pointers(cert, None)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.key_size == int(ca_algorithm[2:])

    assert_clean(lint_cert(path))


# -- CA certificates and the chain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["root-ca.pem", "issuing-ca.pem"])
@pytest.mark.parametrize("ca_algorithm", ["P-256", "P-384"])
def test_ca_certificate_is_clean(hub: Callable[[str, str | None], Cli], ca_algorithm: str, which: str) -> None:
    path = ca_file(hub(ca_algorithm, None), which)
    cert = load_cert(path)
    constraints = _ext(cert, x509.BasicConstraints)
    assert isinstance(constraints, x509.BasicConstraints) and constraints.ca
    assert constraints.path_length == (1 if which == "root-ca.pem" else 0)

    assert_clean(lint_cert(path))


CHAIN_CASES = [
    pytest.param("root-ca.pem", "root-ca.pem", id="root-self-signed"),
    pytest.param("root-ca.pem", "issuing-ca.pem", id="root-issuing"),
    pytest.param("issuing-ca.pem", "ocsp-signer.pem", id="issuing-ocsp-signer"),
    pytest.param("issuing-ca.pem", "device", id="issuing-device"),
]


@pytest.mark.parametrize(("issuer", "subject"), CHAIN_CASES)
@pytest.mark.parametrize("ca_algorithm", ["P-256", "P-384"])
def test_chain_links_are_clean(
    hub: Callable[[str, str | None], Cli], tmp_path: Path, ca_algorithm: str, issuer: str, subject: str
) -> None:
    """Each issuer/subject pair: names chain, AKI matches the issuer's SKI, the signature verifies."""
    cli = hub(ca_algorithm, PUBLIC_URL)
    issuer_path = ca_file(cli, issuer)
    if subject == "device":
        subject_path, _ = issue(cli, tmp_path, "device", "p256", "chain-device")
    else:
        subject_path = ca_file(cli, subject)
    load_cert(subject_path).verify_directly_issued_by(load_cert(issuer_path))

    assert_clean(lint_chain(issuer_path, subject_path))


def test_chain_linter_sees_a_broken_link(hub: Callable[[str, str | None], Cli]) -> None:
    """Negative control: the root as issuer of an end-entity certificate it did not sign is reported."""
    cli = hub("P-256", None)
    findings = lint_chain(ca_file(cli, "root-ca.pem"), ca_file(cli, "ocsp-signer.pem"))
    assert any(f.severity in BLOCKING for f in findings), findings


# -- CRLs -----------------------------------------------------------------------------------------------------------

REASONS = {
    # CLI reason -> the CRLReason entry extension expected (None: absent, RFC 5280 5.3.1 for 'unspecified')
    "unspecified": None,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}


@pytest.mark.parametrize("encoding", ["pem", "der"])
@pytest.mark.parametrize("ca_algorithm", ["P-256", "P-384"])
def test_crl_with_every_reason_is_clean(
    fresh: Callable[[str], Cli], tmp_path: Path, ca_algorithm: str, encoding: str
) -> None:
    cli = fresh(ca_algorithm)
    expected: dict[int, x509.ReasonFlags | None] = {}
    for index, (reason, flag) in enumerate(REASONS.items()):
        _, record = issue(cli, tmp_path, "device", "p256", f"revoked-{index}")
        cli.ok("cert", "revoke", record["serial"], "--reason", reason)
        expected[int(str(record["serial"]), 16)] = flag
    path = tmp_path / f"crl.{encoding}"
    cli.ok("crl", "--out", path, *(["--der"] if encoding == "der" else []))

    data = path.read_bytes()
    crl = x509.load_der_x509_crl(data) if encoding == "der" else x509.load_pem_x509_crl(data)
    issuing = load_cert(ca_file(cli, "issuing-ca.pem"))
    issuing_key = issuing.public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(issuing_key)
    assert {entry.serial_number: _entry_reason(entry) for entry in crl} == expected

    assert_clean(lint_crl(path))


def _entry_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


@pytest.mark.parametrize("ca_algorithm", ["P-256", "P-384"])
def test_empty_crl_is_clean(fresh: Callable[[str], Cli], tmp_path: Path, ca_algorithm: str) -> None:
    cli = fresh(ca_algorithm)
    path = tmp_path / "empty.crl"
    cli.ok("crl", "--out", path)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1

    assert_clean(lint_crl(path))


# -- OCSP responses ---------------------------------------------------------------------------------------------

_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


def ocsp_request(
    issuer: x509.Certificate, *, serial: int, algorithm: str, nonce: bytes | None, cert: x509.Certificate | None
) -> bytes:
    """A DER request for ``cert`` (or, without one, for ``serial`` under ``issuer``)."""
    builder = ocsp.OCSPRequestBuilder()
    if cert is not None:
        builder = builder.add_certificate(cert, issuer, _HASH[algorithm]())
    else:
        key = issuer.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key_bits = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        builder = builder.add_certificate_by_hash(
            hashlib.new(algorithm, issuer.subject.public_bytes()).digest(),
            hashlib.new(algorithm, key_bits).digest(),
            serial,
            _HASH[algorithm](),
        )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def respond(cli: Cli, tmp_path: Path, request: bytes, label: str) -> tuple[Path, ocsp.OCSPResponse]:
    req_path = tmp_path / f"{label}.req"
    req_path.write_bytes(request)
    out = tmp_path / f"{label}.resp"
    cli.ok("ocsp", "respond", "--request", req_path, "--out", out)
    return out, ocsp.load_der_ocsp_response(out.read_bytes())


OCSP_CASES = [
    # (CA key algorithm, CertID hash, nonce): every hash and nonce choice under each CA algorithm
    pytest.param("P-256", "sha1", True, id="ca-p256-sha1-nonce"),
    pytest.param("P-256", "sha256", False, id="ca-p256-sha256-no-nonce"),
    pytest.param("P-384", "sha256", True, id="ca-p384-sha256-nonce"),
    pytest.param("P-384", "sha1", False, id="ca-p384-sha1-no-nonce"),
]


@pytest.mark.parametrize(("ca_algorithm", "algorithm", "with_nonce"), OCSP_CASES)
def test_ocsp_responses_are_clean(
    hub: Callable[[str, str | None], Cli], tmp_path: Path, ca_algorithm: str, algorithm: str, with_nonce: bool
) -> None:
    """good, then revoked (keyCompromise; and unspecified, which carries no reason), and unknown."""
    cli = hub(ca_algorithm, PUBLIC_URL)
    issuing = load_cert(ca_file(cli, "issuing-ca.pem"))
    signer = load_cert(ca_file(cli, "ocsp-signer.pem"))
    label = f"ocsp-{algorithm}-{'nonce' if with_nonce else 'plain'}"
    paths = {}
    for name in ("kc", "unspec"):
        paths[name], _ = issue(cli, tmp_path, "device", "p256", f"{label}-{name}")
    certs = {name: load_cert(p) for name, p in paths.items()}

    def check(name: str, cert: x509.Certificate | None, serial: int, status: ocsp.OCSPCertStatus) -> ocsp.OCSPResponse:
        nonce = os.urandom(16) if with_nonce else None
        request = ocsp_request(issuing, serial=serial, algorithm=algorithm, nonce=nonce, cert=cert)
        path, response = respond(cli, tmp_path, request, name)
        assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert response.certificate_status is status
        assert response.serial_number == serial
        assert isinstance(response.hash_algorithm, _HASH[algorithm])
        ski = _ext(signer, x509.SubjectKeyIdentifier)
        assert isinstance(ski, x509.SubjectKeyIdentifier) and response.responder_key_hash == ski.digest
        signer_key, signature_hash = signer.public_key(), response.signature_hash_algorithm
        assert isinstance(signer_key, ec.EllipticCurvePublicKey) and signature_hash is not None
        signer_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(signature_hash))
        echoed = _response_nonce(response)
        assert echoed == nonce
        assert_clean(lint_ocsp(path))
        return response

    check("good", certs["kc"], certs["kc"].serial_number, ocsp.OCSPCertStatus.GOOD)

    cli.ok("cert", "revoke", f"{certs['kc'].serial_number:X}", "--reason", "keyCompromise")
    revoked = check("revoked-kc", certs["kc"], certs["kc"].serial_number, ocsp.OCSPCertStatus.REVOKED)
    assert revoked.revocation_reason is x509.ReasonFlags.key_compromise
    assert revoked.revocation_time_utc is not None

    cli.ok("cert", "revoke", f"{certs['unspec'].serial_number:X}", "--reason", "unspecified")
    unspecified = check("revoked-unspec", certs["unspec"], certs["unspec"].serial_number, ocsp.OCSPCertStatus.REVOKED)
    assert unspecified.revocation_reason is None

    never_issued = int.from_bytes(os.urandom(16), "big") | 1
    check("unknown", None, never_issued, ocsp.OCSPCertStatus.UNKNOWN)


def _response_nonce(response: ocsp.OCSPResponse) -> bytes | None:
    try:
        return response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


def test_ocsp_refusal_for_another_issuer_is_clean(hub: Callable[[str, str | None], Cli], tmp_path: Path) -> None:
    """A request about a certificate of another CA (here: the issuing CA itself, issued by the root) is answered
    with the unsuccessful status 'unauthorized', which must be a well-formed response too."""
    cli = hub("P-256", None)
    root = load_cert(ca_file(cli, "root-ca.pem"))
    issuing = load_cert(ca_file(cli, "issuing-ca.pem"))
    request = ocsp_request(root, serial=issuing.serial_number, algorithm="sha256", nonce=None, cert=issuing)
    path, response = respond(cli, tmp_path, request, "foreign")
    assert response.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED

    assert_clean(lint_ocsp(path))

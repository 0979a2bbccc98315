"""`make demo`: a scripted walk through Warden's CLI in a temporary data directory.

It runs the real `warden` command and the real `openssl` binary, prints every step as a plain line (so it reads
the same in a terminal and in a pipe), and exits non-zero on the first step that does not do what it should.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARDEN = str(Path(sys.executable).with_name("warden"))


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def run(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"    $ {shown}", flush=True)
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    for line in (result.stdout + result.stderr).strip().splitlines():
        print(f"      {line}", flush=True)
    if expect_ok and result.returncode != 0:
        print(f"demo failed: '{shown}' exited with {result.returncode}", file=sys.stderr, flush=True)
        sys.exit(1)
    if not expect_ok and result.returncode == 0:
        print(f"demo failed: '{shown}' should have been refused", file=sys.stderr, flush=True)
        sys.exit(1)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mqtt_publish(base: list[str], topic: str, *, expect: int) -> None:
    """Publish one QoS 1 message with mosquitto_pub and check the broker's PUBACK reason code (MQTT 5: 16 = accepted,
    no subscriber yet; 135 = not authorized)."""
    shown = " ".join([*base[:1], "...", "-t", topic])
    print(f"    $ {shown}", flush=True)
    result = subprocess.run([*base, "-t", topic, "-d"], capture_output=True, text=True, timeout=60)
    codes = [line.rsplit("RC:", 1)[1].rstrip(")") for line in result.stdout.splitlines() if "PUBACK" in line]
    meaning = {"16": "accepted", "0": "accepted", "135": "refused: not authorized"}
    answer = meaning.get(codes[0], f"reason code {codes[0]}") if codes else "no answer (connection refused)"
    print(f"      broker: {answer}", flush=True)
    if (codes[0] if codes else None) != str(expect) and not (expect == 16 and codes and codes[0] == "0"):
        print(f"demo failed: expected reason code {expect} on {topic}", file=sys.stderr, flush=True)
        sys.exit(1)


def hub_server_walkthrough(w: list[str], work: Path, data: Path) -> None:
    """Start `warden serve` and let devices onboard themselves over EST with curl, as a real device would."""
    port = free_port()
    broker_port = free_port()
    url = f"https://hub.fleet.acme.test:{port}"
    curl = ["curl", "-sS", "--fail-with-body", "--resolve", f"hub.fleet.acme.test:{port}:127.0.0.1"]
    curl += ["--cacert", str(data / "ca" / "root-ca.pem")]
    step(f"Start the hub server (HTTPS only; it issues its own certificate for hub.fleet.acme.test) on port {port}")
    log = (work / "serve.log").open("wb")
    env = {**os.environ, "WARDEN_BROKER_PORT": str(broker_port)}
    server = subprocess.Popen([*w, "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*curl, f"{url}/healthz"], capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                print((work / "serve.log").read_text(), flush=True)
                print("demo failed: the hub server did not start", file=sys.stderr, flush=True)
                sys.exit(1)
            time.sleep(0.2)
        run(*curl, f"{url}/healthz")

        step("A device without a factory certificate onboards with a one-time token over EST (curl + openssl)")
        token = json.loads(run(*w, "enrollment", "add", "boiler-7", "--token", "--expires", "1h", "--json").stdout)
        key, der = work / "boiler-7.key", work / "boiler-7.csr.der"
        run(
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-subj", "/CN=boiler-7", "-outform", "DER", "-out", str(der),
        )  # fmt: skip
        (work / "boiler-7.csr.b64").write_bytes(base64.encodebytes(der.read_bytes()))
        enroll = [*curl, "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{work / 'boiler-7.csr.b64'}"]
        answer = run(*enroll, "-H", f"Authorization: Bearer {token['token']}", f"{url}/.well-known/est/simpleenroll")
        (work / "boiler-7.p7").write_bytes(base64.b64decode(answer.stdout))
        run("openssl", "pkcs7", "-inform", "DER", "-in", str(work / "boiler-7.p7"), "-print_certs",
            "-out", str(work / "boiler-7.pem"))  # fmt: skip
        run("openssl", "x509", "-in", str(work / "boiler-7.pem"), "-noout", "-subject", "-enddate")
        step("The token was single use: a second enrollment with it is refused (and audited)")
        run(*enroll, "-H", f"Authorization: Bearer {token['token']}", f"{url}/.well-known/est/simpleenroll",
            expect_ok=False)  # fmt: skip

        step("The device renews over EST with its operational certificate as TLS client certificate (a new key)")
        run(
            "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(work / "boiler-7b.key"), "-subj", "/CN=boiler-7", "-outform", "DER", "-out", str(der),
        )  # fmt: skip
        (work / "boiler-7.csr.b64").write_bytes(base64.encodebytes(der.read_bytes()))
        answer = run(*enroll, "--cert", str(work / "boiler-7.pem"), "--key", str(key),
                     f"{url}/.well-known/est/simplereenroll")  # fmt: skip
        (work / "boiler-7b.p7").write_bytes(base64.b64decode(answer.stdout))
        run("openssl", "pkcs7", "-inform", "DER", "-in", str(work / "boiler-7b.p7"), "-print_certs",
            "-out", str(work / "boiler-7b.pem"))  # fmt: skip
        run("openssl", "x509", "-in", str(work / "boiler-7b.pem"), "-noout", "-serial")

        step(f"The device talks MQTT to the hub's Mosquitto (mutual TLS, port {broker_port}): its own topics only")
        pub = [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker_port), "-V", "mqttv5",
            "--cafile", str(data / "broker" / "ca.pem"), "--cert", str(work / "boiler-7b.pem"),
            "--key", str(work / "boiler-7b.key"), "-q", "1", "-m", '{"temp": 21.5}',
            "--insecure",  # the broker's name (broker.fleet.acme.test) does not resolve here; the chain is checked
        ]  # fmt: skip
        mqtt_publish(pub, "warden/boiler-7/telemetry", expect=16)
        mqtt_publish(pub, "warden/boiler-8/telemetry", expect=135)
        mqtt_publish(pub, "warden/boiler-7/commands", expect=135)

        step("An operator quarantines the device through the API: only its health topic stays open, at once")
        operator = json.loads(run(*w, "token", "create", "--role", "operator", "--expires", "1h", "--json").stdout)
        run(*curl, "-H", f"Authorization: Bearer {operator['token']}", "-X", "POST", "-H",
            "Content-Type: application/json", "--data", '{"state": "quarantined", "reason": "demo"}',
            f"{url}/api/v1/devices/boiler-7/state")  # fmt: skip
        mqtt_publish(pub, "warden/boiler-7/telemetry", expect=135)
        mqtt_publish(pub, "warden/boiler-7/health", expect=16)
        run(*curl, "-H", f"Authorization: Bearer {operator['token']}", "-X", "POST", "-H",
            "Content-Type: application/json", "--data", '{"state": "active", "reason": "demo: released"}',
            f"{url}/api/v1/devices/boiler-7/state")  # fmt: skip
        mqtt_publish(pub, "warden/boiler-7/telemetry", expect=16)

        step("An operator uses the REST API with a token of the 'viewer' role; writing needs more")
        api = json.loads(run(*w, "token", "create", "--role", "viewer", "--expires", "1h", "--json").stdout)
        auth = ["-H", f"Authorization: Bearer {api['token']}"]
        run(*curl, *auth, f"{url}/api/v1/devices/boiler-7")
        run(*curl, *auth, "-X", "POST", "-H", "Content-Type: application/json", "--data", '{"state": "disabled"}',
            f"{url}/api/v1/devices/boiler-7/state", expect_ok=False)  # fmt: skip

        step("OCSP over HTTP: 'good', then the certificate is revoked and the hub answers 'revoked'")
        issuer, chain = str(data / "ca" / "issuing-ca.pem"), str(data / "ca" / "chain.pem")
        cert = str(work / "boiler-7b.pem")
        for when in ("before", "after"):
            if when == "after":
                serial = run("openssl", "x509", "-in", cert, "-noout", "-serial").stdout.strip().split("=")[1]
                run(*w, "cert", "revoke", serial, "--reason", "keyCompromise")
            request = work / f"ocsp-{when}.der"
            run("openssl", "ocsp", "-sha256", "-issuer", issuer, "-cert", cert, "-reqout", str(request))
            response = run(*curl, "-H", "Content-Type: application/ocsp-request", "--data-binary", f"@{request}",
                           "-o", str(work / f"ocsp-{when}.resp"), f"{url}/pki/ocsp")  # fmt: skip
            del response
            run("openssl", "ocsp", "-respin", str(work / f"ocsp-{when}.resp"), "-issuer", issuer, "-CAfile", chain,
                "-no_nonce", "-sha256", "-cert", cert)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    keep = "--keep" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="warden-demo-"))
    data = work / "data"
    w = [WARDEN, "--data-dir", str(data)]
    try:
        step("Create a hub: root CA, issuing CA (P-256), encrypted key store, database, audit log")
        run(*w, "init", "--org", "Acme Demo", "--fleet-domain", "fleet.acme.test")
        run(*w, "ca", "show")

        step("Register a device group and three devices (they start as 'pending')")
        run(*w, "group", "add", "boilers", "--description", "boiler controllers")
        for n, site in ((1, "berlin"), (2, "berlin"), (3, "paris")):
            run(*w, "device", "add", f"boiler-{n}", "--group", "boilers", "--tag", f"site={site}")
        run(*w, "device", "list")

        step("Each device makes its own key and CSR (openssl); the hub signs the CSR, never seeing the key")
        for n in (1, 2, 3):
            key, csr = work / f"boiler-{n}.key", work / f"boiler-{n}.csr"
            run(
                "openssl",
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(key),
                "-subj",
                f"/CN=anything-the-device-asks-for-{n}",
                "-out",
                str(csr),
            )
            run(
                *w, "cert", "sign", "--device", f"boiler-{n}", "--csr", str(csr), "--out", str(work / f"boiler-{n}.pem")
            )
        run("openssl", "x509", "-in", str(work / "boiler-1.pem"), "-noout", "-subject", "-ext", "subjectAltName")

        step("A weak key is refused with a clear error, and nothing is written")
        run(
            "openssl",
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            str(work / "weak.key"),
            "-subj",
            "/CN=weak",
            "-out",
            str(work / "weak.csr"),
        )
        run(
            *w,
            "cert",
            "sign",
            "--device",
            "boiler-3",
            "--csr",
            str(work / "weak.csr"),
            "--out",
            str(work / "weak.pem"),
            expect_ok=False,
        )

        step("Publish the CA chain and a CRL; openssl verifies every device certificate")
        run(*w, "ca", "export-chain", "--out", str(work / "chain.pem"))
        run(*w, "crl", "--out", str(work / "crl.pem"))
        for n in (1, 2, 3):
            run(
                "openssl",
                "verify",
                "-CAfile",
                str(work / "chain.pem"),
                "-crl_check",
                "-CRLfile",
                str(work / "crl.pem"),
                str(work / f"boiler-{n}.pem"),
            )

        step("boiler-2's key leaks: revoke its certificate and quarantine it; openssl now rejects it")
        serial = json.loads(run(*w, "cert", "list", "--device", "boiler-2", "--json").stdout)[0]["serial"]
        run(*w, "cert", "revoke", serial, "--reason", "keyCompromise")
        run(*w, "device", "quarantine", "boiler-2", "--reason", "key leaked")
        run(*w, "crl", "--out", str(work / "crl.pem"))
        run(
            "openssl",
            "verify",
            "-CAfile",
            str(work / "chain.pem"),
            "-crl_check",
            "-CRLfile",
            str(work / "crl.pem"),
            str(work / "boiler-2.pem"),
            expect_ok=False,
        )
        step("A quarantined device gets no new certificate")
        run(
            *w,
            "cert",
            "sign",
            "--device",
            "boiler-2",
            "--csr",
            str(work / "boiler-1.csr"),
            "--out",
            str(work / "x.pem"),
            expect_ok=False,
        )

        step("OCSP: the delegated responder answers 'revoked' for boiler-2, 'good' for boiler-1")
        issuer = str(data / "ca" / "issuing-ca.pem")
        for n in (1, 2):
            req, resp = work / f"ocsp-{n}.req", work / f"ocsp-{n}.resp"
            run(
                "openssl",
                "ocsp",
                "-sha256",
                "-issuer",
                issuer,
                "-cert",
                str(work / f"boiler-{n}.pem"),
                "-reqout",
                str(req),
            )
            run(*w, "ocsp", "respond", "--request", str(req), "--out", str(resp))
            run(
                "openssl",
                "ocsp",
                "-respin",
                str(resp),
                "-issuer",
                issuer,
                "-VAfile",
                str(data / "ca" / "ocsp-signer.pem"),
                "-CAfile",
                str(work / "chain.pem"),
                # openssl rebuilds the CertID from -cert (so -sha256 again) with a nonce of its own; the echo of
                # the request's nonce is checked by the interop tests.
                "-no_nonce",
                "-sha256",
                "-cert",
                str(work / f"boiler-{n}.pem"),
            )

        step("Take the root CA offline; the hub keeps issuing with the issuing CA")
        run(*w, "ca", "export-root", "--out", str(work / "root-ca-offline.pem"))
        run(
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ed25519",
            "-nodes",
            "-keyout",
            str(work / "boiler-1b.key"),
            "-subj",
            "/CN=boiler-1",
            "-out",
            str(work / "boiler-1b.csr"),
        )
        run(
            *w,
            "cert",
            "renew",
            "--device",
            "boiler-1",
            "--csr",
            str(work / "boiler-1b.csr"),
            "--out",
            str(work / "boiler-1b.pem"),
            "--revoke-superseded",
        )
        run("openssl", "verify", "-CAfile", str(work / "chain.pem"), str(work / "boiler-1b.pem"))

        hub_server_walkthrough(w, work, data)

        step("Every change above is in the hash-chained audit log; sign a checkpoint and verify the chain")
        run(*w, "audit", "checkpoint")
        run(*w, "audit", "list")
        run(*w, "audit", "verify")
        step("Done.")
    finally:
        if keep:
            print(f"kept the demo's files in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The TLS floor, with openssl on both ends: ``s_client`` against a Warden listener, and ``s_server`` as the
positive control that shows the client arguments themselves would work."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import openssl
from tests.hubserver import HUB_NAME, free_port


@dataclass
class Handshake:
    rc: int
    output: str

    @property
    def protocol(self) -> str | None:
        match = re.search(r"^Protocol version: (\S+)$", self.output, re.MULTILINE)
        return match[1] if match else None

    @property
    def cipher(self) -> str | None:
        match = re.search(r"^Ciphersuite: (\S+)$", self.output, re.MULTILINE)
        return match[1] if match else None

    @property
    def established(self) -> bool:
        return self.rc == 0 and "CONNECTION ESTABLISHED" in self.output


def s_client(port: int, *args: str) -> Handshake:
    proc = openssl(
        "s_client", "-brief", "-connect", f"127.0.0.1:{port}", "-servername", HUB_NAME, *args, input=b"", check=False
    )
    return Handshake(proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"))


def control(throwaway: tuple[Path, Path], client: list[str], server: list[str]) -> Handshake:
    """One ``openssl s_client`` handshake against an ``openssl s_server`` configured with ``server``."""
    cert, key = throwaway
    port = free_port()
    process = subprocess.Popen(
        [
            *("openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key)),
            *("-naccept", "1", "-www", *server),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.strip() == b"ACCEPT":
                break
        else:
            raise AssertionError("openssl s_server did not start")
        return s_client(port, *client)
    finally:
        process.kill()
        process.wait(timeout=10)
        process.stdout.close()


LEGACY = "DEFAULT:@SECLEVEL=0"
REFUSED = [
    pytest.param(["-tls1", "-cipher", LEGACY], "TLSv1", "protocol_version", id="tls1.0"),
    pytest.param(["-tls1_1", "-cipher", LEGACY], "TLSv1.1", "protocol_version", id="tls1.1"),
    pytest.param(
        ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256"], "TLSv1.2", "handshake_failure", id="tls1.2-cbc-sha256"
    ),
    pytest.param(["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"], "TLSv1.2", "handshake_failure", id="tls1.2-cbc-sha"),
]

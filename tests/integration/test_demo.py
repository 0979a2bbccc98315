"""``warden demo`` (what ``make demo`` runs) end to end, unattended: output to a pipe, plain lines, exit 0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(), reason="needs mosquitto"
)


def test_demo_runs_unattended_and_contains_the_impostor(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "warden.cli", "demo", "--devices", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "5 devices onboarded with their IDevIDs over EST and connected over mutual TLS" in out
    assert "refused by the broker (least privilege, reason code 135)" in out
    assert "the hub's ingest restricted" in out
    quarantine = re.search(r"the impostor was cut off (\d+) ms after the command", out)
    revocation = re.search(r"session dropped (\d+) ms after the command; a new TLS handshake with it is refused", out)
    assert quarantine is not None and revocation is not None, out
    # No terminal: no escape sequences, no live view.
    assert "\x1b[" not in out
    # The temporary data directory is removed afterwards.
    assert not list(Path("/tmp").glob(f"warden-demo-*{tmp_path.name}*"))

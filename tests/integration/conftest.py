"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import openssl


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed P-256 server certificate for ``openssl s_server``, made by openssl."""
    directory = tmp_path_factory.mktemp("s_server")
    cert, key = directory / "server.pem", directory / "server.key"
    openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-days", "1"),
    )
    return cert, key

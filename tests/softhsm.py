"""SoftHSM2 tokens for tests: one token directory a test, so tests never share or leak tokens.

SoftHSM reads ``SOFTHSM2_CONF`` only in ``C_Initialize``, and python-pkcs11 keeps one initialised module per
path for the whole process. So after pointing ``SOFTHSM2_CONF`` at a new configuration, call
:func:`unload_module` or the module keeps serving the previous test's tokens; the next ``pkcs11.lib()`` loads it
afresh. Close every key store and python-pkcs11 session first: a raw python-pkcs11 session used after the unload
crashes the interpreter (a key store notices and reopens its session).

With pytest, use ``monkeypatch`` so the variable is restored after the test::

    uri, env = make_softhsm_token(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    unload_module()
    ...  # and unload_module() again at teardown

Outside pytest, :func:`softhsm_token` does the same and restores the previous value on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_AVAILABLE: bool = os.path.exists(SOFTHSM_MODULE) and shutil.which("softhsm2-util") is not None
SKIP_REASON = f"SoftHSM2 is not installed (needs softhsm2-util on PATH and {SOFTHSM_MODULE})"


def make_softhsm_token(
    tmp_path: Path, label: str = "warden", pin: str = "1234", so_pin: str = "5678"
) -> tuple[str, dict[str, str]]:
    """Create a token in a fresh token directory under ``tmp_path``.

    Returns the token's PKCS#11 URI (with the PIN as pin-value) and the environment the module needs
    (``{"SOFTHSM2_CONF": ...}``). Does not touch ``os.environ``: apply the environment with
    ``monkeypatch.setenv`` (then :func:`unload_module`) or use :func:`softhsm_token`.
    """
    base = tmp_path / "softhsm"
    tokens = base / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    env = {"SOFTHSM2_CONF": str(conf)}
    result = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed ({result.returncode}): {result.stderr.strip()}")
    return f"pkcs11:token={label}?module-path={SOFTHSM_MODULE}&pin-value={pin}", env


def unload_module() -> None:
    """Finalise and unload the SoftHSM module, so its next use reads ``SOFTHSM2_CONF`` again."""
    import pkcs11  # here, so importing this helper never needs python-pkcs11

    pkcs11.unload(SOFTHSM_MODULE)


@contextmanager
def softhsm_token(tmp_path: Path, label: str = "warden", pin: str = "1234", so_pin: str = "5678") -> Iterator[str]:
    """A token for the duration of the ``with`` block; yields its URI. Restores ``SOFTHSM2_CONF`` on exit."""
    uri, env = make_softhsm_token(tmp_path, label=label, pin=pin, so_pin=so_pin)
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        unload_module()
        yield uri
    finally:
        unload_module()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

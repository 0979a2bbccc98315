"""Small file helpers for the shells: atomic writes (never a half-written file) and size-limited reads."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from warden.core.errors import ConfigurationError, InvalidInputError

__all__ = ["read_limited", "write_file_atomic", "write_private_file"]


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one: a temporary file
    in the same directory, fsync, rename over the target, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileNotFoundError:
        raise ConfigurationError(f"cannot write {path}: its directory does not exist") from None
    except PermissionError:
        raise ConfigurationError(f"cannot write {path}: permission denied") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private_file(path: Path, data: bytes) -> None:
    """:func:`write_file_atomic` with mode 0600, for keys and passphrases."""
    write_file_atomic(path, data, mode=0o600)


def read_limited(path: Path, limit: int, *, what: str) -> bytes:
    """Read at most ``limit`` bytes of ``path``; a larger file is an :class:`InvalidInputError`."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise InvalidInputError(f"{what} {path} is not readable") from None
    if len(data) > limit:
        raise InvalidInputError(f"{what} {path} is larger than the limit of {limit} bytes")
    return data

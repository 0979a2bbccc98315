"""Time and randomness enter Warden through these small protocols so that domain code stays exact in tests."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Protocol

__all__ = ["Clock", "FixedClock", "Random", "SystemClock", "SystemRandom", "utc"]


def utc(value: dt.datetime) -> dt.datetime:
    """Return ``value`` as an aware UTC datetime (naive values are taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class FixedClock:
    """A clock for tests: stands still until advanced."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = utc(start)

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta) -> None:
        self._now += delta


class Random(Protocol):
    def token_bytes(self, n: int) -> bytes:
        """``n`` bytes from a cryptographically secure source."""
        ...


class SystemRandom:
    def token_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

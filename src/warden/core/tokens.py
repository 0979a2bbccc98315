"""Bearer secrets of the form ``<id>.<secret>``: API tokens and one-time enrollment tokens.

Invariants: a secret carries 256 random bits and is shown once; only ``HMAC-SHA256(key, secret)`` is stored, under a
hub-wide key, so a copy of the database alone lets nobody authenticate. The id is not secret: it locates the stored
MAC in one indexed lookup, so verifying costs one HMAC (microseconds), not a password hash (argon2's 150 ms would
let any client burn the hub's CPU).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from warden.core.clock import Random
from warden.core.errors import AuthenticationError

__all__ = ["MAC_KEY_BYTES", "Token", "new_token", "split_token", "token_mac", "verify_mac"]

MAC_KEY_BYTES = 32
_ID = re.compile(r"^[a-z]{2,4}_[0-9a-f]{16}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
#: anything longer cannot be a token: refused before any work
MAX_TOKEN_CHARS = 128


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    secret: str

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}"

    def __repr__(self) -> str:  # never the secret
        return f"Token(id={self.id!r}, secret=<hidden>)"


def new_token(prefix: str, random: Random) -> Token:
    """A fresh token: ``<prefix>_<16 hex>`` id and a 256-bit secret (43 base64url characters)."""
    if not re.fullmatch(r"[a-z]{2,4}", prefix):
        raise ValueError("a token prefix is 2-4 lower-case letters")
    token_id = f"{prefix}_{random.token_bytes(8).hex()}"
    secret = base64.urlsafe_b64encode(random.token_bytes(32)).rstrip(b"=").decode("ascii")
    return Token(token_id, secret)


def split_token(text: str, *, prefix: str) -> Token:
    """Parse ``<id>.<secret>``; anything else raises :class:`AuthenticationError` (without echoing the input)."""
    if len(text) > MAX_TOKEN_CHARS or text.count(".") != 1:
        raise AuthenticationError("malformed token", hint="a token looks like <id>.<secret>")
    token_id, secret = text.split(".")
    if not _ID.fullmatch(token_id) or not token_id.startswith(prefix + "_") or not _SECRET.fullmatch(secret):
        raise AuthenticationError("malformed token", hint="a token looks like <id>.<secret>")
    return Token(token_id, secret)


def token_mac(key: bytes, token: Token) -> str:
    """The stored form of a token: HMAC-SHA256 over its id and secret (binding the secret to its id)."""
    return hmac.new(key, f"{token.id}.{token.secret}".encode("ascii"), hashlib.sha256).hexdigest()


def verify_mac(key: bytes, token: Token, stored: str) -> bool:
    return hmac.compare_digest(token_mac(key, token), stored)

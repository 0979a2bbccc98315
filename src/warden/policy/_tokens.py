"""API tokens: create (shown once), authenticate, list, revoke. Every change is audited with who made it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

from warden.core import (
    AuthenticationError,
    Clock,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    Random,
    Token,
    new_token,
    split_token,
    token_mac,
    verify_mac,
)
from warden.monitor import AuditEvent, AuditLog
from warden.policy._model import Action, ApiToken, Principal, Role
from warden.policy._ports import PolicyTransactions

__all__ = ["TokenService", "authorize", "parse_role"]

_PREFIX = "wt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
MAX_TOKEN_LIFETIME = dt.timedelta(days=366)


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise InvalidInputError(
            f"unknown role {text[:30]!r}", hint=f"use one of: {', '.join(r.value for r in Role)}"
        ) from None


def authorize(principal: Principal, action: Action) -> None:
    """Raise :class:`PermissionDeniedError` unless ``principal``'s role allows ``action``."""
    if not principal.may(action):
        raise PermissionDeniedError(
            f"role {principal.role} may not {action}", hint="ask for a token with a role that allows it"
        )


class TokenService:
    def __init__(
        self, *, transactions: PolicyTransactions, audit: AuditLog, clock: Clock, random: Random, key: bytes
    ) -> None:
        self._tx = transactions
        self._audit = audit
        self._clock = clock
        self._random = random
        self._key = key

    def create(self, *, role: Role, expires_in: dt.timedelta, actor: str, name: str = "") -> tuple[ApiToken, Token]:
        """A new API token; the secret is in the returned :class:`Token` and nowhere else."""
        if not dt.timedelta(minutes=1) <= expires_in <= MAX_TOKEN_LIFETIME:
            raise InvalidInputError("an API token expires after 1 minute to 366 days")
        if name and not _NAME.fullmatch(name):
            raise InvalidInputError("a token name is 1-64 letters, digits, spaces and ._@-")
        token = new_token(_PREFIX, self._random)
        now = self._clock.now()
        record = ApiToken(
            id=token.id,
            name=name or token.id,
            role=role,
            created_at=now,
            expires_at=now + expires_in,
            created_by=actor[:128],
        )
        with self._tx() as uow:
            uow.tokens.insert(record, token_mac(self._key, token))
            self._audit.append(
                uow,
                AuditEvent(
                    actor,
                    "token.create",
                    f"token:{token.id}",
                    details={"name": record.name, "role": str(role), "expires_at": record.expires_at},
                ),
            )
        return record, token

    def authenticate(self, text: str) -> Principal:
        """The principal a bearer token stands for. One generic error for every failure (no oracle)."""
        failure = AuthenticationError("the API token is not valid", hint="create one with 'warden token create'")
        try:
            token = split_token(text, prefix=_PREFIX)
        except AuthenticationError:
            raise failure from None
        with self._tx(readonly=True) as uow:
            found = uow.tokens.get(token.id)
        if found is None:
            raise failure
        record, mac = found
        if not verify_mac(self._key, token, mac) or not record.usable(self._clock.now()):
            raise failure
        return Principal(actor=f"token:{record.id}", role=record.role, token_id=record.id)

    def list(self) -> list[ApiToken]:
        with self._tx(readonly=True) as uow:
            return uow.tokens.find()

    def revoke(self, token_id: str, *, actor: str) -> ApiToken:
        with self._tx() as uow:
            found = uow.tokens.get(token_id)
            if found is None:
                raise NotFoundError(f"no API token {token_id[:40]!r}", hint="see 'warden token list'")
            record = found[0]
            if record.revoked_at is not None:
                raise IllegalTransitionError(f"API token {token_id} is revoked already")
            now = self._clock.now()
            uow.tokens.revoke(token_id, now)
            self._audit.append(
                uow, AuditEvent(actor, "token.revoke", f"token:{token_id}", details={"name": record.name})
            )
        return dataclasses.replace(record, revoked_at=now)

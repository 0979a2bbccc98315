"""What the policy context needs from storage; ``warden.store`` implements it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from warden.monitor import AuditStore
from warden.policy._model import ApiToken

__all__ = ["PolicyTransactions", "PolicyUnitOfWork", "TokenStore"]


class TokenStore(Protocol):
    def insert(self, token: ApiToken, mac: str) -> None: ...
    def get(self, token_id: str) -> tuple[ApiToken, str] | None:
        """The token and its stored MAC."""
        ...

    def find(self) -> list[ApiToken]: ...
    def revoke(self, token_id: str, now: dt.datetime) -> None: ...


class PolicyUnitOfWork(Protocol):
    @property
    def tokens(self) -> TokenStore: ...
    @property
    def audit(self) -> AuditStore: ...
    def after_commit(self, callback: Callable[[], None]) -> None: ...


class PolicyTransactions(Protocol):
    def __call__(self, *, readonly: bool = False) -> AbstractContextManager[PolicyUnitOfWork]: ...

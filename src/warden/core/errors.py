"""The one exception tree of Warden.

Every error Warden raises on purpose derives from :class:`WardenError`. Third-party errors are wrapped at the
boundary (``raise ... from e``) so callers only ever catch ours::

    WardenError
    +-- ConfigurationError            settings, data directory, passphrase sources
    |   +-- NotInitialisedError       the data directory has no Warden state yet
    +-- InvalidInputError             malformed or oversized input
    +-- NotFoundError                 unknown device, group, certificate, ...
    +-- AlreadyExistsError            duplicate device id, group name, ...
    +-- IllegalTransitionError        a device state change the state machine forbids
    +-- PKIError
    |   +-- CSRRejectedError          unparsable CSR, bad signature, weak or unsupported key
    |   +-- IssuanceRefusedError      the device may not get a certificate in its current state
    |   +-- KeyStoreError             key store missing, unreadable or unusable
    |   |   +-- KeyStoreLockedError   wrong passphrase or PIN, locked token
    |   +-- OCSPRequestError          malformed or unsupported OCSP request
    +-- StorageError                  the database failed or is at the wrong schema revision
    +-- AuditIntegrityError           the audit chain does not verify
    +-- AuthenticationError           no credentials, or credentials that do not verify (HTTP 401)
    +-- PermissionDeniedError         authenticated, but not allowed to do this (HTTP 403)
    +-- RateLimitedError              too many requests from one client or address (HTTP 429)

Each error carries a one-line message a user can act on, an optional hint, and structured context that never holds
secrets. ``diagnostics()`` renders both for the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "AlreadyExistsError",
    "AuditIntegrityError",
    "AuthenticationError",
    "CSRRejectedError",
    "ConfigurationError",
    "IllegalTransitionError",
    "InvalidInputError",
    "IssuanceRefusedError",
    "KeyStoreError",
    "KeyStoreLockedError",
    "NotFoundError",
    "NotInitialisedError",
    "OCSPRequestError",
    "PKIError",
    "PermissionDeniedError",
    "RateLimitedError",
    "StorageError",
    "WardenError",
]


class WardenError(Exception):
    """Root of every error Warden raises on purpose."""

    #: process exit status the CLI uses for this class of error
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context: Mapping[str, object] = context

    def diagnostics(self) -> str:
        """One line for the user, plus the hint when there is one."""
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigurationError(WardenError):
    exit_code = 3


class NotInitialisedError(ConfigurationError):
    pass


class InvalidInputError(WardenError):
    exit_code = 2


class NotFoundError(WardenError):
    exit_code = 4


class AlreadyExistsError(WardenError):
    exit_code = 5


class IllegalTransitionError(WardenError):
    exit_code = 6


class PKIError(WardenError):
    pass


class CSRRejectedError(PKIError):
    exit_code = 2


class IssuanceRefusedError(PKIError):
    exit_code = 6


class KeyStoreError(PKIError):
    exit_code = 7


class KeyStoreLockedError(KeyStoreError):
    pass


class OCSPRequestError(PKIError):
    exit_code = 2


class StorageError(WardenError):
    exit_code = 8


class AuditIntegrityError(WardenError):
    exit_code = 9


class AuthenticationError(WardenError):
    exit_code = 10


class PermissionDeniedError(WardenError):
    exit_code = 11


class RateLimitedError(WardenError):
    exit_code = 12

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None, **context: object) -> None:
        super().__init__(message, hint=hint, **context)
        self.retry_after = retry_after


class BrokerError(WardenError):
    """The MQTT broker could not be started, refused a command or did not answer."""

    exit_code = 13

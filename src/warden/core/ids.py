"""Identifiers and names, validated once at the edge.

Invariants:
- A device id is 1-63 characters of ``[a-z0-9-]`` that neither starts nor ends with ``-`` and has no ``--`` in
  positions 3-4. It is always a valid DNS label, because every device certificate carries the DNS SAN
  ``<device-id>.<fleet-domain>`` (RFC 1035 limits a label to 63 octets; see docs/adr/0002-device-ids.md).
- A device id never contains a dot; service and hub identities always do, so the two can never be confused.
- A short list of reserved ids (``hub``, ``broker``, ...) is refused for devices.
"""

from __future__ import annotations

import re

from warden.core.errors import InvalidInputError

__all__ = [
    "RESERVED_DEVICE_IDS",
    "validate_device_id",
    "validate_dns_name",
    "validate_fleet_domain",
    "validate_group_name",
    "validate_tag",
]

_DEVICE_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
_TAG_VALUE_MAX = 256

RESERVED_DEVICE_IDS: frozenset[str] = frozenset(
    {
        "admin",
        "all",
        "api",
        "broker",
        "ca",
        "commands",
        "crl",
        "est",
        "hub",
        "localhost",
        "mqtt",
        "ocsp",
        "root",
        "warden",
        "www",
    }
)


def validate_device_id(value: str) -> str:
    """Return ``value`` if it is a legal device id, else raise :class:`InvalidInputError`."""
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value):
        raise InvalidInputError(
            f"invalid device id {value[:80]!r}",
            hint="use 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        )
    if value[2:4] == "--":
        raise InvalidInputError(
            f"invalid device id {value!r}", hint="'--' in positions 3-4 is reserved for IDNA labels"
        )
    if value in RESERVED_DEVICE_IDS:
        raise InvalidInputError(f"device id {value!r} is reserved", hint="choose another id")
    return value


def validate_dns_name(value: str) -> str:
    """A lower-case DNS host name of at least two labels (so never a device id), at most 253 characters."""
    if not isinstance(value, str) or len(value) > 253 or "." not in value:
        raise InvalidInputError(
            f"invalid DNS name {str(value)[:80]!r}", hint="use a fully qualified name such as hub.example.com"
        )
    labels = value.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise InvalidInputError(
            f"invalid DNS name {value[:80]!r}",
            hint="use lower-case labels of a-z, 0-9 and '-', separated by dots",
        )
    return value


def validate_fleet_domain(value: str) -> str:
    """The fleet domain: a DNS name short enough that ``<63-char device id>.<domain>`` still fits in 253."""
    value = validate_dns_name(value.lower() if isinstance(value, str) else value)
    if len(value) > 253 - 64:
        raise InvalidInputError(f"fleet domain {value[:80]!r} is too long", hint="use at most 189 characters")
    return value


def validate_group_name(value: str) -> str:
    if not isinstance(value, str) or not _GROUP_NAME.fullmatch(value):
        raise InvalidInputError(
            f"invalid group name {str(value)[:80]!r}",
            hint="use 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
        )
    return value


def validate_tag(text: str) -> tuple[str, str]:
    """Parse ``key=value``."""
    key, sep, value = text.partition("=")
    if not sep or not _TAG_KEY.fullmatch(key) or len(value) > _TAG_VALUE_MAX or not value.isprintable():
        raise InvalidInputError(
            f"invalid tag {text[:80]!r}",
            hint="use key=value; key of letters, digits and _.:/-, value printable",
        )
    return key, value

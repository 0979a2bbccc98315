"""Structured logging for the hub server: one JSON object per line, carrying the current request id.

Usage::

    configure_logging(level="INFO")                     # once, at start-up (idempotent)
    token = request_id.set("3f2a...")                   # per request, e.g. in a middleware
    log.info("device enrolled", extra={"fields": {"device": "d-17"}})
    request_id.reset(token)

Run uvicorn with ``log_config=None`` so that it does not install its own handlers again after
:func:`configure_logging` has routed its loggers to the root logger.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json as _json
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["JsonFormatter", "configure_logging", "request_id"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("warden_request_id", default=None)
"""The id of the request being handled in the current context, or None outside a request."""

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Keys the formatter writes itself. An extra field with one of these names is written as "field.<name>" instead of
# overwriting it.
_RESERVED = frozenset({"time", "level", "logger", "message", "request_id", "exc_type", "exc", "stack"})

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _safe_str(value: object) -> str:
    """``str(value)``, or something printable when even that fails."""
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


def _rfc3339(created: float) -> str:
    """``created`` (seconds since the epoch) as RFC 3339 UTC with milliseconds, e.g. 2026-11-25T10:00:00.123Z."""
    try:
        stamp = dt.datetime.fromtimestamp(created, tz=dt.UTC)
    except (OverflowError, OSError, ValueError, TypeError):
        stamp = dt.datetime.now(dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _message(record: logging.LogRecord) -> str:
    """The formatted message; a record whose arguments do not fit its format still yields something readable."""
    try:
        return record.getMessage()
    except Exception:
        return f"{_safe_str(record.msg)} (unformattable args: {_safe_str(record.args)})"


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of JSON.

    Keys: ``time`` (RFC 3339 UTC, milliseconds), ``level``, ``logger``, ``message``; ``request_id`` when the
    :data:`request_id` context variable is set; the items of ``extra={"fields": {...}}`` (non-JSON values through
    ``str``; a field named like one of the keys above is written as ``field.<name>``); ``exc_type`` and ``exc``
    (the formatted traceback) when the record carries exception info; ``stack`` for ``stack_info``.

    :meth:`format` never raises: whatever cannot be serialised is turned into a string, and in the last resort a
    minimal object with the message text is written.
    """

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception:
            fallback = {
                "time": _rfc3339(getattr(record, "created", 0.0)),
                "level": _safe_str(getattr(record, "levelname", "?")),
                "logger": _safe_str(getattr(record, "name", "?")),
                "message": _safe_str(getattr(record, "msg", "")),
                "format_error": True,
            }
            return _json.dumps(fallback)

    def _format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        rid = request_id.get()
        if rid is not None:
            payload["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for name, value in fields.items():
                key = _safe_str(name)
                payload[f"field.{key}" if key in _RESERVED else key] = value
        elif fields is not None:
            payload["field.fields"] = fields
        exc_info = record.exc_info
        if exc_info and exc_info[0] is not None:
            payload["exc_type"] = exc_info[0].__name__
            if not record.exc_text:
                record.exc_text = self.formatException(exc_info)
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        try:
            return _json.dumps(payload, default=_safe_str, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            # NaN/inf, non-string dictionary keys, cycles...: keep the structure of the top level only.
            safe = {
                key: value if isinstance(value, str | int | bool) or value is None else _safe_str(value)
                for key, value in payload.items()
            }
            return _json.dumps(safe)


class _WardenHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs, recognisable so that a second call replaces it."""

    warden_installed = True


def configure_logging(*, level: str = "INFO", json: bool = True, stream: TextIO | None = None) -> None:
    """Send all logging to ``stream`` (standard error by default) through one handler on the root logger.

    ``json`` selects :class:`JsonFormatter`; otherwise a plain ``time LEVEL logger: message`` line. Calling again
    replaces the handler installed by the previous call (handlers installed by others are left alone). The
    ``uvicorn``, ``uvicorn.error`` and ``uvicorn.access`` loggers lose their own handlers, inherit the root level and
    propagate to the root logger, so the server's lines come out in the same format. Raises ``ValueError`` for an
    unknown level name.
    """
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    handler = _WardenHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "warden_installed", False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levels[name])
    for logger_name in _UVICORN_LOGGERS:
        logger = logging.getLogger(logger_name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True

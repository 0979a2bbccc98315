"""JSON log lines, the request-id context variable and the idempotent root-logger set-up."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from warden.api._logging import JsonFormatter, configure_logging, request_id

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put the root and uvicorn loggers back afterwards."""
    names = ("", *UVICORN)
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def make_record(msg: object = "hello %s", args: Any = ("world",), **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("warden.test", logging.WARNING, __file__, 1, msg, args, None)
    record.created = 1_795_600_800.1234  # 2026-11-25T10:00:00.123Z
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def format_json(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def test_basic_keys() -> None:
    out = format_json(make_record())
    assert out == {
        "time": "2026-11-25T10:00:00.123Z",
        "level": "WARNING",
        "logger": "warden.test",
        "message": "hello world",
    }


def test_request_id_from_context() -> None:
    token = request_id.set("req-42")
    try:
        assert format_json(make_record())["request_id"] == "req-42"
    finally:
        request_id.reset(token)
    assert "request_id" not in format_json(make_record())


def test_extra_fields_merged_and_made_json_safe() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd!"

    fields = {"device": "d-17", "count": 3, "ok": True, "obj": Odd(), "nested": {"a": [1, 2]}, "message": "clash"}
    out = format_json(make_record(fields=fields))
    assert out["device"] == "d-17"
    assert out["count"] == 3
    assert out["ok"] is True
    assert out["obj"] == "odd!"
    assert out["nested"] == {"a": [1, 2]}
    assert out["message"] == "hello world"  # a field cannot overwrite the formatter's keys...
    assert out["field.message"] == "clash"  # ...it is kept under another name


def test_exception_info() -> None:
    logger = logging.getLogger("warden.test.exc")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        try:
            raise KeyError("missing")
        except KeyError:
            logger.exception("it broke")
    finally:
        logger.removeHandler(handler)
    out = json.loads(stream.getvalue())
    assert out["message"] == "it broke"
    assert out["level"] == "ERROR"
    assert out["exc_type"] == "KeyError"
    assert "Traceback" in out["exc"]
    assert "missing" in out["exc"]


@pytest.mark.parametrize(
    "record",
    [
        make_record("%d items", ("not a number",)),  # args do not fit the format
        make_record("no args", ("extra",)),
        make_record(object(), ()),
        make_record(fields={"x": float("nan")}),
        make_record(fields={"x": {(1, 2): "tuple key"}}),
        make_record(fields="not a mapping"),
        make_record(fields={1: "int key"}),
    ],
)
def test_odd_input_never_raises(record: logging.LogRecord) -> None:
    out = format_json(record)
    assert out["logger"] == "warden.test"
    assert isinstance(out["message"], str)


def test_unprintable_values() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no str")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    out = format_json(make_record("%s", (Hostile(),), fields={"h": Hostile()}))
    assert isinstance(out["message"], str)
    assert out["h"] == "<unprintable Hostile>"


def ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, "warden_installed", False)]


def test_configure_json_and_idempotent() -> None:
    stream = io.StringIO()
    configure_logging(level="debug", stream=stream)
    configure_logging(level="DEBUG", stream=stream)
    root = logging.getLogger()
    assert len(ours(root)) == 1
    assert root.level == logging.DEBUG
    token = request_id.set("abc")
    try:
        logging.getLogger("warden.hub").debug("started", extra={"fields": {"port": 8443}})
    finally:
        request_id.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # not written twice
    out = json.loads(lines[0])
    assert out["message"] == "started"
    assert out["request_id"] == "abc"
    assert out["port"] == 8443
    assert TIME_RE.match(out["time"])


def test_configure_plain_replaces_json() -> None:
    configure_logging(stream=io.StringIO())
    stream = io.StringIO()
    configure_logging(level="WARNING", json=False, stream=stream)
    assert len(ours(logging.getLogger())) == 1
    logging.getLogger("warden.x").info("dropped")
    logging.getLogger("warden.x").warning("kept")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING warden\.x: kept\n", stream.getvalue())


def test_configure_routes_uvicorn_to_root() -> None:
    for name in UVICORN:
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        logger.setLevel(logging.INFO)
    stream = io.StringIO()
    configure_logging(stream=stream)
    for name in UVICORN:
        logger = logging.getLogger(name)
        assert logger.handlers == []
        assert logger.propagate is True
        assert logger.level == logging.NOTSET
    logging.getLogger("uvicorn.access").info("GET / 200")
    assert json.loads(stream.getvalue())["logger"] == "uvicorn.access"


def test_configure_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging(level="LOUD", stream=io.StringIO())
    assert ours(logging.getLogger()) == []

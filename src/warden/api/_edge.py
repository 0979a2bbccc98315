"""The edge of every request, as one plain ASGI middleware (cheaper than a stack of them): a request id (the
client's ``X-Request-ID`` when it is sane, else a new one) in the logs and the response, a structured access log
line, Prometheus metrics per route template, and the request body limit, enforced on ``Content-Length`` before
the body is read and on the bytes actually received."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from warden.api._logging import request_id
from warden.api._metrics import Metrics

__all__ = ["Edge"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
DirectHandler = ASGIApp

access_log = logging.getLogger("warden.access")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._-]{8,64}$")


class Edge:
    """``direct`` maps ``(method, path)`` to a handler that serves that exact request without the framework's
    routing and dependency machinery (the EST enrollment routes, the hub's hottest path); every other request goes
    to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body: int,
        direct: Mapping[tuple[str, str], DirectHandler] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.direct = dict(direct or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = given.decode("ascii") if given is not None and _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        header_rid = rid.encode("ascii")
        max_body = self.max_body

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > max_body):
            status = 413
            await _plain(
                send,
                413,
                b"request body too large\n" if length.isdigit() else b"bad content-length\n",
                header_rid,
                path=scope["path"],
            )
            self._finish(scope, status, started)
            request_id.reset(token)
            return

        received = 0
        response_started = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused, status
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    # A body without a Content-Length (chunked) crossed the limit: answer 413 here, and tell the
                    # app the client went away (a framework would otherwise turn the error into a parse error).
                    if not response_started and not refused:
                        refused, status = True, 413
                        await _plain(send, 413, b"request body too large\n", header_rid, path=scope["path"])
                    return {"type": "http.disconnect"}
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if refused:
                return  # the edge has answered already
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", header_rid)]
            await send(message)

        direct = self.direct.get((scope["method"], scope["path"])) if self.direct else None
        try:
            await (direct or self.app)(scope, limited_receive, send_with_id)
        except Exception:
            if not refused:
                raise
            # The app failed on the disconnect the edge handed it after answering 413: expected, nothing to report.
        finally:
            self._finish(scope, status, started)
            request_id.reset(token)

    def _finish(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        # The router puts the matched route into the scope: its template bounds the metrics' label values.
        template = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(template, scope["method"], str(status)).inc()
        self.metrics.latency.labels(template).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                scope["method"],
                template,
                status,
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"][:256],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "client": client[0] if client else None,
                    }
                },
            )


async def _plain(send: Send, status: int, body: bytes, rid: bytes, *, path: str = "") -> None:
    """An answer from the edge itself: plain text on EST paths (RFC 7030), problem details elsewhere (RFC 9457)."""
    content_type = b"text/plain; charset=utf-8"
    if not path.startswith("/.well-known/est/"):
        content_type = b"application/problem+json"
        body = json.dumps(
            {
                "type": "urn:warden:problem:too-large",
                "title": "request body too large",
                "status": status,
                "detail": body.decode("ascii").strip(),
                "request_id": rid.decode("ascii"),
            }
        ).encode("ascii")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"connection", b"close"),
                (b"x-request-id", rid),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

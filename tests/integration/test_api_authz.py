"""The authorisation matrix of the hub's HTTP surface. It walks every route of the app (``app.routes``), so a new
route cannot be forgotten: each must declare its action (``x-warden-action``), and is then called without a token and
with a token of each role. Protected routes answer 401 (with ``WWW-Authenticate``) without a token, 403 to a role
that lacks the action (per ``ROLE_ACTIONS``), and neither to a role that has it; public routes never ask for an API
token. Also: expired, revoked and malformed credentials, problem details on every 4xx of ``/api/v1``, and the audit
log naming the token behind each change."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.routing import APIRoute
from starlette.routing import Route

from tests.conftest import make_csr
from tests.hubserver import ManufacturerCA, csr_der
from warden.api import ACTION_KEY, PUBLIC, create_app
from warden.hub import Hub
from warden.policy import ROLE_ACTIONS, Action, Role
from warden.registry import Restriction

BASE = "https://hub.test"
PROBLEM = "application/problem+json"

#: Framework routes without ``openapi_extra``: the OpenAPI document, deliberately public. Nothing else may lack it.
FRAMEWORK_PUBLIC = {("GET", "/api/v1/openapi.json"), ("HEAD", "/api/v1/openapi.json")}
#: Public (no API token) routes that authenticate the device itself (TLS client certificate or enrollment token):
#: an API token is no credential there, so their 401 is the device's, and is checked separately.
DEVICE_AUTHENTICATED = {("POST", "/.well-known/est/simpleenroll"), ("POST", "/.well-known/est/simplereenroll")}


class Client:
    """A synchronous face on ``httpx.AsyncClient`` over ``httpx.ASGITransport`` (starlette's TestClient is
    deprecated with httpx): the app runs in-process on a portal's event loop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._portal.call(functools.partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self._portal.call(self._client.aclose)
        self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_client_certificate(app: Any, pem: str) -> Callable[..., Any]:
    """``app`` as ``warden serve`` runs it for a client that presented ``pem`` in the TLS handshake: the certificate
    in the ASGI TLS extension (docs/adr/0004-est-client-certificates.md)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            extensions = {**scope.get("extensions", {}), "tls": {"client_cert_chain": [pem]}}
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return wrapped


@dataclass
class World:
    """A hub with one of everything, the app on it, and an API token per role."""

    hub: Hub
    client: Client
    tokens: dict[Role, str]
    token_ids: dict[Role, str]
    path_values: dict[str, str]
    enrollment_token: str
    device_pem: str
    tmp: Path
    counter: Iterator[int] = field(default_factory=itertools.count)

    def bearer(self, role: Role | None) -> dict[str, str]:
        return {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
def world(hub_factory: Callable[..., Hub], tmp_path: Path) -> Iterator[World]:
    hub = hub_factory()
    tokens: dict[Role, str] = {}
    token_ids: dict[Role, str] = {}
    for role in Role:
        record, token = hub.tokens.create(role=role, expires_in=dt.timedelta(days=1), actor="test", name=str(role))
        tokens[role], token_ids[role] = str(token), record.id
    victim, _ = hub.tokens.create(role=Role.VIEWER, expires_in=dt.timedelta(days=1), actor="test", name="victim")

    hub.devices.add_group("sensors", actor="test")
    hub.devices.add_device("dev-1", actor="test", groups=["sensors"])
    issued = hub.certificates.sign(device_id="dev-1", csr=make_csr(common_name="dev-1"), actor="test")
    hub.certificates.issue_crl(actor="test")

    manufacturer = ManufacturerCA(tmp_path / "maker")
    hub.provisioning.add_group(
        "maker", ca_pem=manufacturer.certificate.public_bytes(serialization.Encoding.PEM), actor="test"
    )
    enrollment, _ = hub.provisioning.add_token_enrollment("dev-2", actor="test")
    # A device that onboarded (so it can be re-armed), and its operational certificate (for simplereenroll).
    _, onboard_token = hub.provisioning.add_token_enrollment("dev-3", actor="test")
    onboarded = hub.provisioning.enroll_with_token(str(onboard_token), make_csr(common_name="dev-3"), source="test")
    command = hub.commands.send("dev-3", "ping", actor="test")
    # Restricted (as the ingest does for flooding), so that an operator's unrestrict succeeds once.
    hub.devices.restrict([Restriction("dev-3", dt.datetime.now(dt.UTC), "flooding (test)", "test")])
    # An enrollment token for simpleenroll with a device credential.
    _, enroll_token = hub.provisioning.add_token_enrollment("dev-4", actor="test")

    path_values = {
        "device_id": "dev-3",
        "serial": issued.record.serial_hex,
        "name": "maker",
        "enrollment_id": enrollment.id,
        "command_id": command.id,
        "token_id": victim.id,
        "encoded": "MAMCAQA=",  # base64 of a DER SEQUENCE that is no OCSP request: answered malformedRequest
    }
    with Client(create_app(hub)) as client:
        yield World(
            hub=hub,
            client=client,
            tokens=tokens,
            token_ids=token_ids,
            path_values=path_values,
            enrollment_token=str(enroll_token),
            device_pem=onboarded.issued.pem.decode("ascii"),
            tmp=tmp_path,
        )


def routes(app: Any) -> list[tuple[str, str, str | None]]:
    """(method, path template, action or None) of every route of the app."""
    found: list[tuple[str, str, str | None]] = []
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__}: {route!r}"
        extra = route.openapi_extra if isinstance(route, APIRoute) else None
        action = (extra or {}).get(ACTION_KEY)
        for method in sorted(route.methods or ()):
            found.append((method, route.path, action))
    return found


def fill_path(world: World, template: str) -> str:
    path = template
    for name in [p.split("}")[0] for p in template.split("{")[1:]]:
        key = name.split(":")[0]
        assert key in world.path_values, f"{template}: no value for the path parameter {key!r}; add one to World"
        path = path.replace("{" + name + "}", world.path_values[key])
    return path


def request_for(world: World, method: str, template: str) -> dict[str, Any]:
    """A well-formed request for the route: a new object each time, so that an allowed call would succeed."""
    n = next(world.counter)
    bodies: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
        ("POST", "/api/v1/devices"): lambda: {"json": {"id": f"new-{n}"}},
        ("POST", "/api/v1/devices/{device_id}/state"): lambda: {"json": {"state": "quarantined", "reason": "matrix"}},
        ("POST", "/api/v1/devices/{device_id}/rearm"): lambda: {"json": {"reason": "matrix"}},
        ("POST", "/api/v1/devices/{device_id}/commands"): lambda: {"json": {"name": "ping"}},
        ("POST", "/api/v1/devices/{device_id}/unrestrict"): lambda: {"json": {"reason": "matrix"}},
        ("POST", "/api/v1/enrollment-groups/{name}/flood-limit"): lambda: {"json": {"flood_limit": 100 + n}},
        ("POST", "/api/v1/certificates/{serial}/revoke"): lambda: {"json": {"reason": "superseded"}},
        ("POST", "/api/v1/enrollment-groups"): lambda: {
            "json": {
                "name": f"maker-{n}",
                "ca_pem": ManufacturerCA(world.tmp / f"maker-{n}")
                .certificate.public_bytes(serialization.Encoding.PEM)
                .decode("ascii"),
            }
        },
        ("POST", "/api/v1/enrollments"): lambda: {"json": {"device_id": f"enr-{n}", "kind": "token"}},
        ("POST", "/api/v1/tokens"): lambda: {"json": {"role": "viewer", "expires_in_days": 1}},
        ("POST", "/pki/ocsp"): lambda: {
            "content": base64.b64decode("MAMCAQA="),
            "headers": {"Content-Type": "application/ocsp-request"},
        },
        ("POST", "/.well-known/est/simpleenroll"): lambda: {
            "content": base64.b64encode(csr_der(f"enr-{n}")[0]),
            "headers": {"Content-Type": "application/pkcs10"},
        },
        ("POST", "/.well-known/est/simplereenroll"): lambda: {
            "content": base64.b64encode(csr_der("dev-3")[0]),
            "headers": {"Content-Type": "application/pkcs10"},
        },
    }
    make = bodies.get((method, template))
    return make() if make is not None else {}


def send(world: World, method: str, path: str, kwargs: dict[str, Any], headers: dict[str, str]) -> Any:
    merged = {**kwargs.get("headers", {}), **headers}
    rest = {k: v for k, v in kwargs.items() if k != "headers"}
    return world.client.request(method, path, headers=merged, **rest)


def assert_problem(response: Any, where: str) -> None:
    assert response.headers["content-type"] == PROBLEM, f"{where}: {response.status_code} is not problem+json"
    body = response.json()
    assert {"type", "title", "status"} <= body.keys(), f"{where}: {body}"
    assert body["status"] == response.status_code, where
    assert body["type"].startswith("urn:warden:problem:"), where


def test_every_route_declares_its_action(world: World) -> None:
    app = world.client.app.app
    missing = [
        (method, path)
        for method, path, action in routes(app)
        if action is None and (method, path) not in FRAMEWORK_PUBLIC
    ]
    assert missing == [], f"routes without {ACTION_KEY} in openapi_extra: {missing}"
    actions = {action for _, _, action in routes(app) if action is not None}
    unknown = actions - {PUBLIC} - {str(a) for a in Action}
    assert unknown == set(), f"routes declaring unknown actions: {unknown}"
    # The OpenAPI document shows the action of every documented operation, too.
    document = world.client.get("/api/v1/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert ACTION_KEY in operation, f"{method.upper()} {path} lacks {ACTION_KEY} in the OpenAPI document"


def test_authorisation_matrix(world: World) -> None:
    app = world.client.app.app
    table = routes(app)
    assert len(table) > 30
    device_authenticated = {(m, p) for m, p, a in table if (m, p) in DEVICE_AUTHENTICATED and a == PUBLIC}
    assert device_authenticated == DEVICE_AUTHENTICATED, "the device-authenticated EST routes must be public"
    problems: list[str] = []
    checked = 0
    succeeded: set[tuple[str, str]] = set()
    for method, template, action in table:
        if (method, template) in DEVICE_AUTHENTICATED:
            continue
        path = fill_path(world, template)
        for role in [None, *Role]:
            where = f"{method} {path} as {role or 'anonymous'}"
            response = send(world, method, path, request_for(world, method, template), world.bearer(role))
            checked += 1
            status = response.status_code
            if status < 300:
                succeeded.add((method, template))
            if path.startswith("/api/v1/") and 400 <= status < 500:
                try:
                    assert_problem(response, where)
                except (AssertionError, ValueError) as e:
                    problems.append(str(e))
            if action is None and (method, template) not in FRAMEWORK_PUBLIC:
                problems.append(f"{method} {template}: no {ACTION_KEY} in its openapi_extra")
            if action is None or action == PUBLIC:
                if status in (401, 403):
                    problems.append(f"{where}: public route answered {status}")
                continue
            if role is None:
                if status != 401 or "www-authenticate" not in response.headers:
                    problems.append(f"{where}: expected 401 with WWW-Authenticate, got {status}")
            elif Action(action) in ROLE_ACTIONS[role]:
                if status in (401, 403) or status >= 500:
                    problems.append(f"{where}: role has {action} but got {status}: {response.text[:200]}")
            elif status != 403:
                problems.append(f"{where}: role lacks {action} but got {status}")
    assert problems == [], "\n".join(problems)
    assert checked >= 5 * 30
    # The requests are real ones: each route succeeded for some caller, so no 4xx hid what was checked.
    never = sorted({(m, p) for m, p, _ in table} - DEVICE_AUTHENTICATED - succeeded)
    assert never == [], f"routes that never answered 2xx in the matrix: {never}"


def test_device_authenticated_est_routes(world: World) -> None:
    """EST enroll routes are public as far as API tokens go: an API token is no device credential there (401, plain
    text as RFC 7030 wants), and the device's own credential is what lets it through."""
    for method, template in sorted(DEVICE_AUTHENTICATED):
        for role in [None, *Role]:
            response = send(world, method, template, request_for(world, method, template), world.bearer(role))
            where = f"{method} {template} as {role or 'anonymous'}"
            assert response.status_code == 401, where
            assert response.headers["www-authenticate"], where
            assert response.headers["content-type"].startswith("text/plain"), where
    basic = base64.b64encode(f"dev-4:{world.enrollment_token}".encode()).decode("ascii")
    enrolled = send(
        world,
        "POST",
        "/.well-known/est/simpleenroll",
        {"content": base64.b64encode(csr_der("dev-4")[0]), "headers": {"Content-Type": "application/pkcs10"}},
        {"Authorization": f"Basic {basic}"},
    )
    assert enrolled.status_code == 200, enrolled.text
    with Client(with_client_certificate(world.client.app, world.device_pem)) as device:
        renewed = device.post(
            "/.well-known/est/simplereenroll",
            content=base64.b64encode(csr_der("dev-3")[0]),
            headers={"Content-Type": "application/pkcs10"},
        )
    assert renewed.status_code == 200, renewed.text


def test_unknown_routes_and_methods_are_problems(world: World) -> None:
    token = world.bearer(Role.SECURITY_ADMIN)
    for method, path, status in (
        ("GET", "/api/v1/nope", 404),
        ("DELETE", "/api/v1/devices", 405),
        ("PUT", "/api/v1/tokens", 405),
    ):
        for headers in ({}, token):
            response = world.client.request(method, path, headers=headers)
            assert response.status_code == status, (method, path, response.status_code)
            assert_problem(response, f"{method} {path}")


def test_bad_requests_are_problems(world: World) -> None:
    token = world.bearer(Role.SECURITY_ADMIN)
    operator = world.bearer(Role.OPERATOR)
    cases: list[tuple[str, str, dict[str, Any], dict[str, str], int]] = [
        ("POST", "/api/v1/devices", {"json": {"id": "Not A Device"}}, operator, 422),
        ("POST", "/api/v1/devices", {"json": {"id": "dev-1"}}, operator, 409),
        (
            "POST",
            "/api/v1/devices",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            operator,
            422,
        ),
        ("POST", "/api/v1/devices", {"json": {"id": "x-1", "unknown": 1}}, operator, 422),
        ("GET", "/api/v1/devices/nope", {}, operator, 404),
        ("GET", "/api/v1/devices", {"params": {"limit": "0"}}, operator, 422),
        ("GET", "/api/v1/devices", {"params": {"tag": "no-equals"}}, operator, 400),
        ("GET", "/api/v1/certificates/zz", {}, token, 400),
        ("GET", "/api/v1/certificates/ABCDEF", {}, token, 404),
        ("POST", "/api/v1/certificates/zz/revoke", {"json": {"reason": "superseded"}}, token, 400),
        ("POST", "/api/v1/certificates/ABCDEF/revoke", {"json": {"reason": "bogus"}}, token, 400),
        ("POST", "/api/v1/enrollments", {"json": {"device_id": "e-1", "kind": "certificate"}}, token, 400),
        ("POST", "/api/v1/enrollment-groups", {"json": {"name": "bad", "ca_pem": "garbage"}}, token, 400),
        ("POST", "/api/v1/tokens/nope/revoke", {}, token, 404),
        ("POST", "/api/v1/tokens", {"json": {"role": "root"}}, token, 422),
        ("POST", "/api/v1/devices/dev-2/rearm", {"json": {}}, token, 409),
    ]
    for method, path, kwargs, headers, status in cases:
        response = send(world, method, path, kwargs, headers)
        where = f"{method} {path} {kwargs}"
        assert response.status_code == status, f"{where}: {response.status_code} {response.text[:300]}"
        assert_problem(response, where)


def test_request_body_too_large_is_a_problem(world: World) -> None:
    """The body limit applies before authentication; on /api/v1 its 413 is problem details like every other 4xx
    (the OpenAPI document promises that), on EST it is plain text."""
    big = b"x" * (4 * 1024 * 1024 + 1)
    response = world.client.post(
        "/api/v1/devices", content=big, headers={**world.bearer(Role.OPERATOR), "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert_problem(response, "POST /api/v1/devices (too large)")
    est = world.client.post(
        "/.well-known/est/simpleenroll", content=big, headers={"Content-Type": "application/pkcs10"}
    )
    assert est.status_code == 413
    assert est.headers["content-type"].startswith("text/plain")


def test_unparsable_body_is_refused_before_it_is_parsed(world: World) -> None:
    for headers, expected in (({}, 401), (world.bearer(Role.VIEWER), 403)):
        for content in (b"{not json", b"\xff\xfe"):
            response = world.client.post(
                "/api/v1/devices", content=content, headers={**headers, "Content-Type": "application/json"}
            )
            assert response.status_code == expected, (headers, content, response.status_code)


class _Later:
    """A clock two minutes ahead: a token made now with a one-minute lifetime has expired for it."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)


def test_expired_token_is_refused(world: World) -> None:
    record, token = world.hub.tokens.create(
        role=Role.SECURITY_ADMIN, expires_in=dt.timedelta(minutes=1), actor="test", name="short"
    )
    headers = {"Authorization": f"Bearer {token}"}
    assert world.client.get("/api/v1/devices", headers=headers).status_code == 200
    with Hub.open(world.hub.settings, clock=_Later()) as later, Client(create_app(later)) as client:
        for path in ("/api/v1/devices", "/api/v1/tokens", "/metrics"):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == 'Bearer realm="warden"'
        # Another role's token, still valid for the later clock, works there: the 401 above is the expiry.
        _, lasting = world.hub.tokens.create(role=Role.VIEWER, expires_in=dt.timedelta(days=1), actor="test")
        assert client.get("/api/v1/devices", headers={"Authorization": f"Bearer {lasting}"}).status_code == 200
    assert record.expires_at < _Later().now()


def test_revoked_token_is_refused(world: World) -> None:
    record, token = world.hub.tokens.create(role=Role.SECURITY_ADMIN, expires_in=dt.timedelta(days=1), actor="t")
    headers = {"Authorization": f"Bearer {token}"}
    assert world.client.get("/api/v1/tokens", headers=headers).status_code == 200
    revoked = world.client.post(f"/api/v1/tokens/{record.id}/revoke", headers=world.bearer(Role.SECURITY_ADMIN))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    for path in ("/api/v1/tokens", "/api/v1/devices", "/metrics"):
        response = world.client.get(path, headers=headers)
        assert response.status_code == 401, path
        assert "www-authenticate" in response.headers
    again = world.client.post(f"/api/v1/tokens/{record.id}/revoke", headers=world.bearer(Role.SECURITY_ADMIN))
    assert again.status_code == 409
    assert_problem(again, "revoke twice")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Bearer ",
        "Bearer garbage",
        "Bearer wt_",
        "Bearer wt_nope.nope",
        "Bearer " + "a" * 4000,
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "bearer",
        "Bearer\tx",
        "Digest username=x",
    ],
)
def test_malformed_authorization_is_refused(world: World, authorization: str) -> None:
    for path in ("/api/v1/devices", "/api/v1/audit", "/metrics"):
        response = world.client.get(path, headers={"Authorization": authorization})
        assert response.status_code == 401, (authorization[:30], path, response.status_code)
        assert response.headers["www-authenticate"] == 'Bearer realm="warden"'
        if path.startswith("/api/v1/"):
            assert_problem(response, f"{authorization[:30]} {path}")


def test_wrong_secret_for_a_real_token_id_is_refused(world: World) -> None:
    real = world.tokens[Role.SECURITY_ADMIN]
    token_id, _, secret = real.partition(".")
    assert secret, "tokens look like <id>.<secret>"
    forged = f"{token_id}.{'A' * len(secret) if secret[0] != 'A' else 'B' * len(secret)}"
    for candidate in (forged, token_id, f"{token_id}.", real + "x", real[:-1]):
        response = world.client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {candidate}"})
        assert response.status_code == 401, candidate
    assert world.client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {real}"}).status_code == 200


def _audit(hub: Hub) -> list[tuple[str, str, str, str]]:
    with hub.db.transaction(readonly=True) as uow:
        return [(r.actor, r.action, r.target, r.outcome) for r in uow.audit.records()]


def test_changes_are_audited_under_the_tokens_identity(world: World) -> None:
    operator = f"token:{world.token_ids[Role.OPERATOR]}"
    admin = f"token:{world.token_ids[Role.SECURITY_ADMIN]}"
    before = len(_audit(world.hub))

    added = world.client.post("/api/v1/devices", json={"id": "audited-1"}, headers=world.bearer(Role.OPERATOR))
    assert added.status_code == 201, added.text
    changed = world.client.post(
        "/api/v1/devices/audited-1/state",
        json={"state": "decommissioned", "reason": "test"},
        headers=world.bearer(Role.OPERATOR),
    )
    assert changed.status_code == 200, changed.text
    serial = world.path_values["serial"]
    revoked = world.client.post(
        f"/api/v1/certificates/{serial}/revoke",
        json={"reason": "keyCompromise"},
        headers=world.bearer(Role.SECURITY_ADMIN),
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    created = world.client.post(
        "/api/v1/tokens", json={"role": "auditor", "name": "ci"}, headers=world.bearer(Role.SECURITY_ADMIN)
    )
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    new_id = created.json()["id"]
    assert created.json()["created_by"] == admin

    records = _audit(world.hub)[before:]
    assert (operator, "device.add", "device:audited-1", "success") in records
    assert (operator, "device.state", "device:audited-1", "success") in records
    assert (admin, "certificate.revoke", "device:dev-1", "success") in records
    with world.hub.db.transaction(readonly=True) as uow:
        revocations = [r.details for r in uow.audit.records() if r.action == "certificate.revoke" and r.actor == admin]
    assert revocations == [{"serial": serial, "reason": "keyCompromise"}]
    assert any(r[0] == admin and r[1] == "crl.issue" for r in records), records
    assert (admin, "token.create", f"token:{new_id}", "success") in records
    # Nothing in this stretch of the log was written under another name, and the new secret is in none of it.
    assert {r[0] for r in records} == {operator, admin}, records
    secret = created.json()["token"]
    with world.hub.db.transaction(readonly=True) as uow:
        dumped = repr(list(uow.audit.records()))
    assert secret not in dumped
    assert secret.partition(".")[2] not in dumped


def test_denied_calls_change_nothing(world: World) -> None:
    before = _audit(world.hub)
    for role in (Role.VIEWER, Role.AUDITOR, Role.SECURITY_ADMIN):
        response = world.client.post("/api/v1/devices", json={"id": f"denied-{role}"}, headers=world.bearer(role))
        assert response.status_code == 403
    assert world.client.post("/api/v1/devices", json={"id": "denied-anon"}).status_code == 401
    assert world.client.get("/api/v1/devices/denied-viewer", headers=world.bearer(Role.VIEWER)).status_code == 404
    assert _audit(world.hub) == before

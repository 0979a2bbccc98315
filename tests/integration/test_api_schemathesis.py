"""Property-based testing of the operator API from its own OpenAPI document (schemathesis): every operation, once per
role with a valid token, with schema-conforming (positive) and schema-violating (negative) requests. No answer is a
5xx, every documented answer matches its schema and media type, no schema-conforming request fails the server's
validation (422), a role that lacks an operation's action is refused with 403 whatever it sends, and at least 90% of
the operations reach a 2xx in some run.

Fuzzing alone cannot guess the id of an existing object, nor write a CA certificate, so each operation also draws
from requests that name seeded objects (a device, a certificate, an enrollment group with a real CA, ...).

Not stateful: schemathesis infers links between the operations, but its state machine replays scenarios against a
hub whose state the previous scenarios changed, which Hypothesis rejects as flaky data generation."""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import make_csr
from tests.hubserver import ManufacturerCA
from warden.api import ACTION_KEY, create_app
from warden.broker import Flood
from warden.hub import Hub
from warden.policy import ROLE_ACTIONS, Action, Role

pytestmark = pytest.mark.slow

POSITIVE_EXAMPLES = 40
NEGATIVE_EXAMPLES = 20
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


def seed(hub: Hub, tmp: Path) -> dict[str, dict[str, Any]]:
    """Objects for the operations that name one, and per operation the fixed parts of a request that reaches them:
    ``path_parameters`` and, where fuzzing would not find a valid one, ``body``."""
    hub.devices.add_group("sensors", actor="test")
    hub.devices.add_device("dev-1", actor="test", groups=["sensors"], tags={"site": "berlin"})
    issued = hub.certificates.sign(device_id="dev-1", csr=make_csr(common_name="dev-1"), actor="test")
    hub.devices.add_device("dev-state", actor="test")
    # A device that onboarded (with a token), so that it can be re-armed.
    _, onboard = hub.provisioning.add_token_enrollment("dev-onboarded", actor="test")
    hub.provisioning.enroll_with_token(str(onboard), make_csr(common_name="dev-onboarded"), source="test")
    maker = ManufacturerCA(tmp / "maker")
    ca_pem = maker.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    hub.provisioning.add_group("maker", ca_pem=ca_pem.encode("ascii"), actor="test")
    enrollment, _ = hub.provisioning.add_token_enrollment("dev-enrolled", actor="test")
    other = ManufacturerCA(tmp / "other", name="Other Devices CA")
    victim, _ = hub.tokens.create(role=Role.VIEWER, expires_in=dt.timedelta(days=1), actor="test", name="victim")
    # A device restricted for flooding, to be released (once: then it answers 409).
    hub.devices.add_device("dev-restricted", actor="test")
    hub.restrict_for_flooding([Flood("dev-restricted", rate=99.0, limit=50.0, window=10.0, messages=990)])
    serial = issued.record.serial_hex
    return {
        "GET /api/v1/devices/{device_id}": {"path_parameters": {"device_id": "dev-1"}},
        "GET /api/v1/devices/{device_id}/certificates": {"path_parameters": {"device_id": "dev-1"}},
        "POST /api/v1/devices/{device_id}/state": {"path_parameters": {"device_id": "dev-state"}},
        "POST /api/v1/devices/{device_id}/rearm": {"path_parameters": {"device_id": "dev-onboarded"}},
        "POST /api/v1/devices/{device_id}/unrestrict": {"path_parameters": {"device_id": "dev-restricted"}},
        "GET /api/v1/certificates/{serial}": {"path_parameters": {"serial": serial}},
        "POST /api/v1/certificates/{serial}/revoke": {
            "path_parameters": {"serial": serial},
            "body": {"reason": "superseded"},
        },
        "POST /api/v1/enrollment-groups": {
            "body": {
                "name": "other",
                "ca_pem": other.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            }
        },
        "GET /api/v1/enrollment-groups/{name}": {"path_parameters": {"name": "maker"}},
        "POST /api/v1/enrollment-groups/{name}/disable": {"path_parameters": {"name": "maker"}},
        "POST /api/v1/enrollment-groups/{name}/enable": {"path_parameters": {"name": "maker"}},
        "POST /api/v1/enrollment-groups/{name}/flood-limit": {"path_parameters": {"name": "maker"}},
        "GET /api/v1/enrollments/{enrollment_id}": {"path_parameters": {"enrollment_id": enrollment.id}},
        "POST /api/v1/enrollments/{enrollment_id}/revoke": {"path_parameters": {"enrollment_id": enrollment.id}},
        # Never one of the tokens the runs use (only security-admin may revoke; once revoked it answers 409).
        "POST /api/v1/tokens/{token_id}/revoke": {"path_parameters": {"token_id": victim.id}},
    }


def strategy(operation: Any, fixed: dict[str, Any] | None) -> Any:
    positive = operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)
    if not fixed:
        return positive
    return st.one_of(positive, operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE, **fixed))


def negatable(operation: Any) -> bool:
    """Whether a request can violate the schema at all: path parameters are free strings, so only a body or a
    query parameter can be wrong (for the others Hypothesis would only report Unsatisfiable, slowly)."""
    raw = operation.definition.raw
    return "requestBody" in raw or any(p.get("in") == "query" for p in raw.get("parameters", []))


def unparsable_body(response: Any) -> bool:
    """The framework's own answer to a body that is not JSON at all (given after authentication; see
    test_api_authz.py::test_unparsable_body_is_refused_before_it_is_parsed)."""
    if response.status_code not in (400, 422):
        return False
    body = response.json()
    if response.status_code == 400:
        return bool(body.get("detail") == "There was an error parsing the body")
    return any(e.get("type") == "json_invalid" for e in body.get("errors", []))


def run_operation(
    cases: Any,
    headers: dict[str, str],
    examples: int,
    record: Callable[[Any], None],
) -> None:
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=cases)
    def test(case: Any) -> None:
        response = case.call(headers=headers)
        record(response)
        case.validate_response(response, checks=CHECKS, headers=headers)

    test()


def test_operator_api_conforms_to_its_schema(hub_factory: Callable[..., Hub], tmp_path: Path) -> None:
    hub = hub_factory()
    fixed = seed(hub, tmp_path)
    app = create_app(hub)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    schema.config.generation.update(with_security_parameters=False)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert len(operations) >= 20
    assert set(fixed) <= labels, set(fixed) - labels

    statuses: dict[tuple[str, Role], collections.Counter[int]] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    for role in Role:
        _, token = hub.tokens.create(role=role, expires_in=dt.timedelta(days=1), actor="test", name=f"fuzz-{role}")
        headers = {"Authorization": f"Bearer {token}"}
        for operation in operations:
            action = Action(operation.definition.raw[ACTION_KEY])
            runs = [("positive", strategy(operation, fixed.get(operation.label)), POSITIVE_EXAMPLES)]
            if negatable(operation):
                negative = operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)
                runs.append(("negative", negative, NEGATIVE_EXAMPLES))
            for mode, cases, examples in runs:
                seen: collections.Counter[int] = collections.Counter()
                refused_unread: list[int] = []
                rejected: list[str] = []

                def record(
                    response: Any,
                    seen: collections.Counter[int] = seen,
                    unread: list[int] = refused_unread,
                    rejected: list[str] = rejected,
                    positive: bool = mode == "positive",
                ) -> None:
                    seen[response.status_code] += 1
                    if unparsable_body(response):
                        unread.append(response.status_code)
                    elif positive and response.status_code == 422:
                        # The schema allowed what the server's validation refuses: the document is wrong.
                        rejected.append(str(response.json().get("errors"))[:500])

                try:
                    run_operation(cases, headers, examples, record)
                except Exception as e:
                    failures.append(f"{operation.label} as {role} ({mode}): {type(e).__name__}: {e}"[:3000])
                statuses[(operation.label, role)].update(seen)
                if rejected:
                    failures.append(f"{operation.label} as {role}: schema-valid requests refused with 422: {rejected}")
                if action not in ROLE_ACTIONS[role]:
                    # Authentication runs before the body is read: a role without the action gets 403, whatever it sent.
                    unexpected = sum(n for status, n in seen.items() if status != 403)
                    if unexpected:
                        failures.append(f"{operation.label} as {role} ({mode}): lacks {action} but got {dict(seen)}")
    assert failures == [], "\n\n".join(failures)

    reached = {label for (label, _), counter in statuses.items() if any(200 <= s < 300 for s in counter)}
    missing = sorted(labels - reached)
    assert len(reached) >= 0.9 * len(labels), f"operations that never reached a 2xx: {missing}"

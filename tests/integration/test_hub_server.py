"""The TLS listener of a real ``warden serve``, seen by tools we did not write: ``openssl s_client`` finds the
protocol floor (TLS 1.2 with AEAD suites, TLS 1.3), with ``openssl s_server`` as the positive control that the same
client could have spoken the refused versions; ``curl`` shows the trust store following enrollment groups and
pinned onboarding certificates changed by the ``warden`` CLI in another process, without a restart, and every
refused handshake counted in ``/metrics``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hubserver import HUB_NAME, HubServer, ManufacturerCA, self_signed, start_hub
from tests.integration._interop import HANDSHAKE_REFUSED, Answer, Csr, Interop, describe, eventually
from tests.integration._tls import REFUSED, control, s_client


@dataclass
class Env:
    hub: HubServer
    tools: Interop
    work: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("hub-server")
    hub = start_hub(base)
    tools: Interop | None = None
    try:
        tools = Interop(hub, base / "work")
        yield Env(hub, tools, base / "work")
    finally:
        if tools is not None:
            tools.close()
        hub.stop()


# -- 3. the TLS floor ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "protocol", "alert"), REFUSED)
def test_hub_refuses_what_the_client_could_speak(
    env: Env, throwaway: tuple[Path, Path], client: list[str], protocol: str, alert: str
) -> None:
    # Positive control: the same client arguments complete a handshake with an openssl server that allows them.
    allowed = control(throwaway, client, client)
    assert allowed.established, allowed.output
    assert allowed.protocol == protocol, allowed.output

    before = env.tools.handshake_failures(alert)
    refused = s_client(env.hub.port, *client, "-CAfile", str(env.hub.root_path), "-verify_return_error")
    assert not refused.established, refused.output
    assert refused.rc != 0
    assert refused.protocol is None and refused.cipher is None, refused.output
    eventually(lambda: env.tools.handshake_failures(alert) > before, what=f"{alert} counted")


@pytest.mark.parametrize(
    ("client", "protocol"),
    [
        pytest.param(["-tls1_2"], "TLSv1.2", id="tls1.2"),
        pytest.param(["-tls1_3"], "TLSv1.3", id="tls1.3"),
    ],
)
def test_hub_speaks_tls12_and_tls13(env: Env, client: list[str], protocol: str) -> None:
    shaken = s_client(env.hub.port, *client, "-CAfile", str(env.hub.root_path), "-verify_return_error")
    assert shaken.established, shaken.output
    assert shaken.protocol == protocol
    assert "Verification: OK" in shaken.output
    assert f"Peer certificate: O = Acme Test, CN = {HUB_NAME}" in shaken.output
    if protocol == "TLSv1.2":
        # ECDHE with an AEAD suite only.
        assert shaken.cipher is not None and shaken.cipher.startswith("ECDHE-")
        assert "GCM" in shaken.cipher or "CHACHA20" in shaken.cipher


# -- 4. the trust store follows the CLI, without a restart ----------------------------------------------------------


def enroll(env: Env, device_id: str, client: tuple[Path, Path]) -> Answer:
    return env.tools.est("simpleenroll", env.tools.csr(device_id).body, client=client)


@pytest.mark.slow
def test_trust_store_follows_enrollment_groups(env: Env) -> None:
    tools, hub = env.tools, env.hub
    maker = ManufacturerCA(env.work / "beta", name="Beta Devices CA")
    first, second = maker.idevid("beta-1"), maker.idevid("beta-2")
    one, two = (first.cert_path, first.key_path), (second.cert_path, second.key_path)

    # Not a group yet: the handshake is refused, and counted.
    unknown = tools.handshake_failures("unknown_ca")
    answer = enroll(env, "beta-1", one)
    assert answer.rc in HANDSHAKE_REFUSED, answer
    assert answer.status == 0
    eventually(lambda: tools.handshake_failures("unknown_ca") > unknown, what="unknown_ca counted")
    assert tools.state("beta-1") is None

    # An operator adds the group from another process; the listener trusts it within seconds.
    reloads = tools.metric("warden_tls_context_reloads_total")
    hub.warden("enrollment", "group", "add", "beta", "--ca", str(maker.path), "--tag", "vendor=beta")

    def enrolled() -> tuple[Answer, Csr] | None:
        csr = tools.csr("beta-1")
        attempt = tools.est("simpleenroll", csr.body, client=one)
        return (attempt, csr) if attempt.status == 200 else None

    answer, csr = eventually(enrolled, what="beta-1 enrolls once the group is trusted")
    (cert,) = tools.certificates(answer)
    assert "CN = beta-1" in describe(cert)
    assert tools.verify(cert)[0] == 0
    device = tools.device("beta-1")
    assert device is not None
    assert (device["state"], device["tags"]) == ("active", {"vendor": "beta"})
    assert tools.metric("warden_tls_context_reloads_total") > reloads

    # Disabled: new devices of that CA are refused (403 until the store reloads, then in the handshake).
    hub.warden("enrollment", "group", "disable", "beta")
    unknown = tools.handshake_failures("unknown_ca")
    refusals: list[Answer] = []

    def refused_in_handshake() -> bool:
        attempt = enroll(env, "beta-2", two)
        refusals.append(attempt)
        assert attempt.status in (0, 403, 429), attempt
        return attempt.rc in HANDSHAKE_REFUSED

    eventually(refused_in_handshake, what="beta-2 refused in the handshake")
    for attempt in refusals:
        if attempt.status == 403:
            assert "disabled" in attempt.text or "no enrollment group" in attempt.text, attempt
    eventually(lambda: tools.handshake_failures("unknown_ca") > unknown, what="unknown_ca counted")
    assert tools.state("beta-2") is None
    assert tools.certificates_of("beta-2") == []

    # A device enrolled before renews with its operational certificate: that trust is the hub's own CA.
    renewal = tools.est("simplereenroll", tools.csr("beta-1").body, client=(cert, csr.key))
    assert renewal.status == 200, renewal

    # Enabled again: beta-2 onboards.
    hub.warden("enrollment", "group", "enable", "beta")
    eventually(lambda: enroll(env, "beta-2", two).status == 200, what="beta-2 enrolls after enable")
    assert tools.state("beta-2") == "active"


@pytest.mark.slow
def test_trust_store_follows_pinned_onboarding_certificates(env: Env) -> None:
    tools, hub = env.tools, env.hub
    pinned = self_signed(env.work / "pinned", "kiosk-1")
    client = (pinned.cert_path, pinned.key_path)
    answer = enroll(env, "kiosk-1", client)
    assert answer.rc in HANDSHAKE_REFUSED, answer

    out = hub.warden("enrollment", "add", "kiosk-1", "--cert", str(pinned.cert_path), "--json").stdout
    enrollment_id = json.loads(out)["id"]
    answer = eventually(
        lambda: (a := enroll(env, "kiosk-1", client)).status == 200 and a, what="kiosk-1 enrolls once pinned"
    )
    (cert,) = tools.certificates(answer)
    assert "CN = kiosk-1" in describe(cert)

    # Revoking the enrollment takes the pin out of the store: the same certificate no longer completes a handshake.
    hub.warden("enrollment", "revoke", enrollment_id)
    eventually(lambda: enroll(env, "kiosk-1", client).rc in HANDSHAKE_REFUSED, what="kiosk-1 refused in the handshake")

"""The provisioning and API-token commands of ``warden`` (in-process): enrollment groups, individual enrollments,
re-arming, API tokens, CSV import and export, and ``serve --help``. Secrets (enrollment and API tokens) are shown
once and are never in a listing, an export or the audit log; a refused command writes nothing."""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import Cli, make_csr
from tests.hubserver import ManufacturerCA, self_signed
from warden.core import AuthenticationError, IssuanceRefusedError, load_settings
from warden.hub import Hub
from warden.policy import Role


def state(cli: Cli) -> tuple[str, ...]:
    """Everything a refused provisioning command must leave as it was."""
    return (
        cli.ok("device", "list", "--json"),
        cli.ok("enrollment", "list", "--json"),
        cli.ok("enrollment", "group", "list", "--json"),
        cli.ok("token", "list", "--json"),
        cli.ok("audit", "list", "--json"),
    )


def audit(cli: Cli) -> list[dict[str, object]]:
    records: list[dict[str, object]] = json.loads(cli.ok("audit", "list", "--json"))
    return records


def maker_ca(tmp_path: Path, name: str = "Acme Devices Manufacturing CA") -> ManufacturerCA:
    return ManufacturerCA(tmp_path / name.replace(" ", "-").lower(), name=name)


def open_hub(cli: Cli) -> Hub:
    return Hub.open(load_settings(cli.data_dir))


# -- enrollment groups ------------------------------------------------------------------------------------------


def test_enrollment_group_lifecycle(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    maker = maker_ca(tmp_path)
    allow = tmp_path / "allow.txt"
    allow.write_text("# devices we bought\nsensor-1\nsensor-2\n")
    added = json.loads(
        cli.ok(
            "enrollment",
            "group",
            "add",
            "acme",
            "--ca",
            maker.path,
            "--tag",
            "site=berlin",
            "--profile",
            "gateway",
            "--validity",
            "90",
            "--allow",
            allow,
            "--json",
        )
    )
    assert added["name"] == "acme"
    assert added["enabled"] is True
    assert added["profile"] == "gateway"
    assert added["validity_days"] == 90
    assert added["tags"] == {"site": "berlin"}
    assert added["allow"] == ["sensor-1", "sensor-2"]
    assert len(added["ca_fingerprints"]) == 1

    text = cli.ok("enrollment", "group", "add", "other", "--ca", maker_ca(tmp_path, "Other CA").path)
    assert "enrollment group other added" in text
    listed = json.loads(cli.ok("enrollment", "group", "list", "--json"))
    assert [g["name"] for g in listed] == ["acme", "other"]
    table = cli.ok("enrollment", "group", "list")
    assert "acme" in table and "other" in table

    shown = json.loads(cli.ok("enrollment", "group", "show", "acme", "--json"))
    assert shown == added
    assert "id_field: cn" in cli.ok("enrollment", "group", "show", "acme")

    assert "disabled" in cli.ok("enrollment", "group", "disable", "acme")
    assert json.loads(cli.ok("enrollment", "group", "show", "acme", "--json"))["enabled"] is False
    again = cli("enrollment", "group", "disable", "acme")
    assert again.code == 6
    assert "disabled" in again.err
    assert "enabled" in cli.ok("enrollment", "group", "enable", "acme")
    assert json.loads(cli.ok("enrollment", "group", "show", "acme", "--json"))["enabled"] is True

    missing = cli("enrollment", "group", "show", "nope")
    assert missing.code == 4
    assert "no enrollment group named 'nope'" in missing.err
    assert cli("enrollment", "group", "disable", "nope").code == 4
    duplicate = cli("enrollment", "group", "add", "acme", "--ca", maker.path)
    assert duplicate.code == 5

    actions = [(r["action"], r["target"]) for r in audit(cli) if str(r["action"]).startswith("enrollment-group.")]
    assert ("enrollment-group.add", "enrollment-group:acme") in actions
    assert ("enrollment-group.add", "enrollment-group:other") in actions
    assert len(actions) == 4  # two adds, one disable, one enable
    assert all(str(r["actor"]).startswith("cli:") for r in audit(cli) if r["target"] == "enrollment-group:acme")


def _too_many_cas(tmp_path: Path) -> bytes:
    return b"".join(
        maker_ca(tmp_path, f"Maker {i}").certificate.public_bytes(serialization.Encoding.PEM) for i in range(17)
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("leaf", "is not a CA certificate"),
        ("garbage", "not PEM certificates"),
        ("empty", "not PEM certificates"),
        ("private-key", "not PEM certificates"),
        ("too-many", "holds 1 to 16 certificates"),
        ("hub-ca", "cannot trust this hub's own CA"),
        ("missing", "does not exist"),
        ("oversized", "larger than"),
    ],
)
def test_bad_ca_files_are_refused(initialised_cli: Cli, tmp_path: Path, kind: str, message: str) -> None:
    cli = initialised_cli
    path = tmp_path / f"{kind}.pem"
    if kind == "leaf":
        path.write_bytes(self_signed(tmp_path, "not-a-ca").certificate.public_bytes(serialization.Encoding.PEM))
    elif kind == "garbage":
        path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "private-key":
        path.write_bytes(
            maker_ca(tmp_path).key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    elif kind == "too-many":
        path.write_bytes(_too_many_cas(tmp_path))
    elif kind == "hub-ca":
        cli.ok("ca", "export-chain", "--out", path)
    elif kind == "oversized":
        path.write_bytes(maker_ca(tmp_path).certificate.public_bytes(serialization.Encoding.PEM) * 2000)
    before = state(cli)
    result = cli("enrollment", "group", "add", "bad", "--ca", path)
    assert result.code == 2, result
    assert message in result.err
    assert result.err.startswith("error: ")
    assert state(cli) == before


# -- individual enrollments -------------------------------------------------------------------------------------


def test_certificate_and_token_enrollments(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    maker = maker_ca(tmp_path)
    idevid = maker.idevid("sensor-1")
    by_cert = json.loads(cli.ok("enrollment", "add", "sensor-1", "--cert", idevid.cert_path, "--json"))
    assert by_cert["kind"] == "certificate"
    assert by_cert["device_id"] == "sensor-1"
    assert by_cert["status"] == "active"
    assert by_cert["certificate_fingerprint"]
    assert "token" not in by_cert
    # The device was registered, pending its first onboarding.
    assert json.loads(cli.ok("device", "show", "sensor-1", "--json"))["state"] == "pending"

    by_token = json.loads(
        cli.ok("enrollment", "add", "sensor-2", "--token", "--expires", "12h", "--profile", "gateway", "--json")
    )
    secret = by_token["token"]
    assert by_token["kind"] == "token"
    assert by_token["profile"] == "gateway"
    assert secret.startswith(by_token["id"] + ".")
    text = cli.ok("enrollment", "add", "sensor-3", "--token")
    assert "shown once" in text
    text_secret = text.strip().splitlines()[-1]
    assert "." in text_secret

    listed = cli.ok("enrollment", "list", "--json")
    table = cli.ok("enrollment", "list")
    assert {e["device_id"] for e in json.loads(listed)} == {"sensor-1", "sensor-2", "sensor-3"}
    assert all("token" not in e for e in json.loads(listed))
    only = json.loads(cli.ok("enrollment", "list", "--device", "sensor-2", "--json"))
    assert [e["id"] for e in only] == [by_token["id"]]
    log = cli.ok("audit", "list", "--json")
    exported = cli.ok("device", "export")
    for shown_once in (secret, text_secret):
        token_secret = shown_once.partition(".")[2]
        assert len(token_secret) >= 16
        for where in (listed, table, log, exported):
            assert shown_once not in where
            assert token_secret not in where
    assert sum(1 for r in json.loads(log) if r["action"] == "enrollment.add") == 3

    # A second active enrollment for a device, both or neither of --cert and --token: refused, nothing written.
    before = state(cli)
    second = cli("enrollment", "add", "sensor-2", "--token")
    assert second.code == 5
    for args in (["--token", "--cert", idevid.cert_path], []):
        result = cli("enrollment", "add", "sensor-9", *args)
        assert result.code == 2
        assert "either --cert FILE or --token" in result.err
    reused = cli("enrollment", "add", "sensor-9", "--cert", idevid.cert_path)
    assert reused.code == 5
    bad_expiry = cli("enrollment", "add", "sensor-9", "--token", "--expires", "soon")
    assert bad_expiry.code == 2
    assert "invalid duration" in bad_expiry.err
    assert state(cli) == before

    # The token onboards: it is the real one, not an echo.
    with open_hub(cli) as hub:
        result = hub.provisioning.enroll_with_token(secret, make_csr(common_name="sensor-2"), source="test")
    assert result.device_id == "sensor-2"


def test_enrollment_revoke(initialised_cli: Cli) -> None:
    cli = initialised_cli
    created = json.loads(cli.ok("enrollment", "add", "sensor-1", "--token", "--json"))
    assert f"enrollment {created['id']} of sensor-1 revoked" in cli.ok("enrollment", "revoke", created["id"])
    listed = json.loads(cli.ok("enrollment", "list", "--status", "revoked", "--json"))
    assert [e["id"] for e in listed] == [created["id"]]
    assert listed[0]["revoked_at"] is not None
    assert json.loads(cli.ok("enrollment", "list", "--status", "active", "--json")) == []
    before = state(cli)
    again = cli("enrollment", "revoke", created["id"])
    assert again.code == 6
    assert cli("enrollment", "revoke", "enr_nope").code == 4
    assert cli("enrollment", "list", "--status", "bogus").code == 2
    assert state(cli) == before
    with open_hub(cli) as hub, pytest.raises(IssuanceRefusedError, match="enrollment token is not valid"):
        hub.provisioning.enroll_with_token(created["token"], make_csr(common_name="sensor-1"), source="test")
    # A revoked enrollment leaves room for a new one.
    cli.ok("enrollment", "add", "sensor-1", "--token")


def test_enrollment_rearm(initialised_cli: Cli) -> None:
    cli = initialised_cli
    cli.ok("device", "add", "fresh")
    before = state(cli)
    never = cli("enrollment", "rearm", "fresh", "--reason", "lost")
    assert never.code == 6
    assert "has not onboarded yet" in never.err
    assert cli("enrollment", "rearm", "nope").code == 4
    assert state(cli) == before

    token = json.loads(cli.ok("enrollment", "add", "onboarded", "--token", "--json"))["token"]
    with open_hub(cli) as hub:
        hub.provisioning.enroll_with_token(token, make_csr(common_name="onboarded"), source="test")
    text = cli.ok("enrollment", "rearm", "onboarded", "--reason", "flash replaced")
    assert "re-onboarding of onboarded armed until" in text
    rearms = [r for r in audit(cli) if r["action"] == "enrollment.rearm"]
    assert len(rearms) == 1
    assert rearms[0]["target"] == "device:onboarded"
    assert rearms[0]["details"]["reason"] == "flash replaced"  # type: ignore[index]
    bad_reason = cli("enrollment", "rearm", "onboarded", "--reason", "x\x07y")
    assert bad_reason.code == 2
    cli.ok("device", "decommission", "onboarded", "--reason", "scrapped")
    assert cli("enrollment", "rearm", "onboarded").code == 6


# -- API tokens -------------------------------------------------------------------------------------------------


def test_token_create_list_revoke(initialised_cli: Cli) -> None:
    cli = initialised_cli
    created = json.loads(cli.ok("token", "create", "--role", "operator", "--name", "ci runner", "--json"))
    secret = created["token"]
    assert created["role"] == "operator"
    assert created["name"] == "ci runner"
    assert created["revoked_at"] is None
    assert created["created_by"].startswith("cli:")
    text = cli.ok("token", "create", "--role", "auditor", "--expires", "12h")
    assert "shown once" in text
    text_secret = text.strip().splitlines()[-1]

    listed = cli.ok("token", "list", "--json")
    table = cli.ok("token", "list")
    log = cli.ok("audit", "list", "--json")
    assert {t["role"] for t in json.loads(listed)} == {"operator", "auditor"}
    for shown_once in (secret, text_secret):
        for where in (listed, table, log):
            assert shown_once not in where
            assert shown_once.partition(".")[2] not in where
    creations = [r["target"] for r in json.loads(log) if r["action"] == "token.create"]
    assert creations[0] == f"token:{created['id']}"

    with open_hub(cli) as hub:
        principal = hub.tokens.authenticate(secret)
    assert principal.role is Role.OPERATOR
    assert principal.actor == f"token:{created['id']}"

    assert f"token {created['id']} revoked" in cli.ok("token", "revoke", created["id"])
    revoked = [t for t in json.loads(cli.ok("token", "list", "--json")) if t["id"] == created["id"]]
    assert revoked[0]["revoked_at"] is not None
    assert "yes" in cli.ok("token", "list")
    with open_hub(cli) as hub, pytest.raises(AuthenticationError, match="not valid"):
        hub.tokens.authenticate(secret)

    before = state(cli)
    assert cli("token", "revoke", created["id"]).code == 6
    assert cli("token", "revoke", "wt_nope").code == 4
    bad_role = cli("token", "create", "--role", "root")
    assert bad_role.code == 2
    assert "unknown role" in bad_role.err
    for expires in ("0m", "400d", "forever"):
        assert cli("token", "create", "--role", "viewer", "--expires", expires).code == 2, expires
    assert cli("token", "create", "--role", "viewer", "--name", "bad\nname").code == 2
    assert state(cli) == before


# -- CSV import and export --------------------------------------------------------------------------------------


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def write_csv(path: Path, data: list[dict[str, str]]) -> Path:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(data[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(data)
    path.write_text(out.getvalue())
    return path


def test_export_edit_import_round_trip(
    initialised_cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = initialised_cli
    maker = maker_ca(tmp_path)
    source.ok("group", "add", "sensors")
    source.ok("group", "add", "berlin")
    source.ok("device", "add", "plain-1", "--name", "Boiler room", "--group", "sensors", "--tag", "site=berlin")
    source.ok("device", "add", "plain-2", "--group", "sensors", "--group", "berlin", "--tag", "hw=v2", "--tag", "a=b")
    source.ok("enrollment", "add", "cert-1", "--cert", maker.idevid("cert-1").cert_path)
    secret = json.loads(source.ok("enrollment", "add", "token-1", "--token", "--json"))["token"]
    (tmp_path / "c.pem").write_bytes(make_csr(common_name="plain-2"))
    source.ok("cert", "sign", "--device", "plain-2", "--csr", tmp_path / "c.pem", "--out", tmp_path / "p2.pem")

    exported = source.ok("device", "export")
    out_file = tmp_path / "export.csv"
    source.ok("device", "export", "--out", out_file)
    assert out_file.read_text() == exported
    assert secret not in exported
    assert secret.partition(".")[2] not in exported
    table = {r["device_id"]: r for r in rows(exported)}
    assert set(table) == {"plain-1", "plain-2", "cert-1", "token-1"}
    assert table["plain-1"]["display_name"] == "Boiler room"
    assert table["plain-1"]["tags"] == "site=berlin"
    assert table["plain-2"]["tags"] == "a=b;hw=v2"
    assert set(table["plain-2"]["groups"].split(";")) == {"sensors", "berlin"}
    assert table["plain-2"]["state"] == "active"
    assert table["cert-1"]["enrollment"] == "certificate"
    assert table["cert-1"]["certificate_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert table["token-1"]["enrollment"] == "token"
    assert table["token-1"]["certificate_pem"] == ""

    # Edit: a new name, no states (the devices start pending in the new hub whatever they were), one more device.
    edited = [dict(r) for r in rows(exported)]
    for row in edited:
        if row["device_id"] == "plain-1":
            row["display_name"] = "Boiler room (moved)"
        row["state"] = ""
    edited.append(dict.fromkeys(edited[0], "") | {"device_id": "added-1", "tags": "site=paris"})
    edited_file = write_csv(tmp_path / "edited.csv", edited)

    target = Cli(capsys, tmp_path / "fresh")
    target.ok("init", "--org", "Acme Test", "--fleet-domain", "fleet.acme.test")
    target.ok("group", "add", "sensors")
    target.ok("group", "add", "berlin")
    before = state(target)
    tokens_out = tmp_path / "tokens.csv"
    needs = target("device", "import", edited_file)
    assert needs.code == 2
    assert "--tokens-out" in needs.err
    assert state(target) == before
    assert not tokens_out.exists()

    text = target.ok("device", "import", edited_file, "--tokens-out", tokens_out)
    assert "imported 5 device(s), 1 token(s)" in text
    assert stat.S_IMODE(tokens_out.stat().st_mode) == 0o600
    token_lines = tokens_out.read_text().splitlines()
    assert len(token_lines) == 1
    device_id, _, new_secret = token_lines[0].partition(",")
    assert device_id == "token-1"
    assert new_secret != secret  # a new one-time token: tokens are never exported
    assert new_secret not in text

    devices = {d["id"]: d for d in json.loads(target.ok("device", "list", "--json"))}
    assert set(devices) == {"plain-1", "plain-2", "cert-1", "token-1", "added-1"}
    assert devices["plain-1"]["display_name"] == "Boiler room (moved)"
    assert devices["plain-1"]["tags"] == {"site": "berlin"}
    assert set(devices["plain-2"]["groups"]) == {"sensors", "berlin"}
    assert {d["state"] for d in devices.values()} == {"pending"}
    enrollments = {e["device_id"]: e for e in json.loads(target.ok("enrollment", "list", "--json"))}
    source_enrollments = {e["device_id"]: e for e in json.loads(source.ok("enrollment", "list", "--json"))}
    assert enrollments["cert-1"]["certificate_fingerprint"] == source_enrollments["cert-1"]["certificate_fingerprint"]
    assert enrollments["token-1"]["kind"] == "token"
    log = target.ok("audit", "list", "--json")
    assert new_secret not in log
    assert new_secret.partition(".")[2] not in log
    with open_hub(target) as hub:
        assert hub.provisioning.enroll_with_token(new_secret, make_csr(common_name="token-1"), source="t").device_id

    # Exported again, the new hub describes the same fleet (but for the edits).
    again = {r["device_id"]: r for r in rows(target.ok("device", "export"))}
    assert again["cert-1"]["certificate_pem"] == table["cert-1"]["certificate_pem"]
    assert again["plain-2"]["tags"] == table["plain-2"]["tags"]

    # The same file again: every device exists already, nothing is written, no tokens file.
    before = state(target)
    twice = target("device", "import", edited_file, "--tokens-out", tmp_path / "tokens2.csv")
    assert twice.code == 5
    assert state(target) == before
    assert not (tmp_path / "tokens2.csv").exists()
    existing = target("device", "import", edited_file, "--tokens-out", tokens_out)
    assert existing.code == 2
    assert "exists already" in existing.err


BAD_ROWS = {
    "bad id": {"device_id": "Not_A_Device"},
    "reserved id": {"device_id": "hub"},
    "duplicate id": {"device_id": "good-1"},
    "unknown state": {"device_id": "bad-1", "state": "bogus"},
    "unknown group": {"device_id": "bad-1", "groups": "nope"},
    "bad tag": {"device_id": "bad-1", "tags": "no-equals"},
    "unknown enrollment": {"device_id": "bad-1", "enrollment": "magic"},
    "garbage certificate": {"device_id": "bad-1", "enrollment": "certificate", "certificate_pem": "garbage"},
    "no certificate": {"device_id": "bad-1", "enrollment": "certificate"},
    "existing device": {"device_id": "already"},
}


@pytest.mark.parametrize("problem", sorted(BAD_ROWS))
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_one_bad_row_refuses_the_whole_file(initialised_cli: Cli, tmp_path: Path, problem: str, position: str) -> None:
    cli = initialised_cli
    cli.ok("group", "add", "sensors")
    cli.ok("device", "add", "already")
    columns = ("device_id", "display_name", "state", "tags", "groups", "enrollment", "certificate_pem")
    good = [
        dict.fromkeys(columns, "") | {"device_id": "good-1", "groups": "sensors", "enrollment": "token"},
        dict.fromkeys(columns, "") | {"device_id": "good-2", "tags": "site=berlin"},
        dict.fromkeys(columns, "") | {"device_id": "good-3", "enrollment": "token"},
    ]
    bad = dict.fromkeys(columns, "") | BAD_ROWS[problem]
    index = {"first": 0, "middle": 2, "last": 3}[position]
    if problem == "duplicate id" and position == "first":
        index = 1  # a duplicate is the second occurrence
    data = [*good[:index], bad, *good[index:]]
    path = write_csv(tmp_path / "import.csv", data)
    tokens_out = tmp_path / "tokens.csv"
    before = state(cli)
    result = cli("device", "import", path, "--tokens-out", tokens_out)
    assert result.code in (2, 4, 5), result
    assert result.err.startswith("error: ")
    assert state(cli) == before
    assert not tokens_out.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "header row with a device_id column"),
        (b"id,name\nx,y\n", "header row with a device_id column"),
        (b"device_id,colour\nx,red\n", "unknown CSV column"),
        (b"device_id\n\xff\xfe\n", "not UTF-8"),
    ],
)
def test_malformed_import_files_are_refused(initialised_cli: Cli, tmp_path: Path, data: bytes, message: str) -> None:
    cli = initialised_cli
    path = tmp_path / "import.csv"
    path.write_bytes(data)
    before = state(cli)
    result = cli("device", "import", path)
    assert result.code == 2
    assert message in result.err
    assert state(cli) == before


def test_import_needs_tokens_out_only_for_token_rows(initialised_cli: Cli, tmp_path: Path) -> None:
    """A file without enrollment=token rows imports without --tokens-out, even when "token" appears elsewhere in
    it (an id, a name, a tag)."""
    cli = initialised_cli
    path = tmp_path / "import.csv"
    path.write_text("device_id,display_name,tags,enrollment\ntoken-reader,Token reader,kind=token,\n")
    assert "imported 1 device(s), 0 token(s)" in cli.ok("device", "import", path)


def test_import_from_standard_input_and_bad_tokens_out(initialised_cli: Cli, tmp_path: Path) -> None:
    cli = initialised_cli
    before = state(cli)
    directory = cli("device", "import", tmp_path / "x.csv", "--tokens-out", tmp_path)
    assert directory.code == 2
    missing_dir = cli("device", "import", tmp_path / "x.csv", "--tokens-out", tmp_path / "nope" / "t.csv")
    assert missing_dir.code == 2
    missing_file = cli("device", "import", tmp_path / "x.csv")
    assert missing_file.code == 2
    assert "does not exist" in missing_file.err
    assert state(cli) == before


# -- serve ------------------------------------------------------------------------------------------------------


def test_serve_has_help(cli: Cli) -> None:
    result = cli("serve", "--help")
    assert result.code == 0, result
    for option in ("--host", "--port", "--workers"):
        assert option in result.out
    assert "HTTPS" in result.out

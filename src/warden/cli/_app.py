"""The ``warden`` command: parses, calls the hub's services, prints. No logic of its own lives here."""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import io
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import typer.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from warden.cli._output import (
    audit_json,
    certificate_json,
    device_json,
    emit_json,
    enrollment_group_json,
    enrollment_json,
    group_json,
    restriction_json,
    table,
    token_json,
)
from warden.core import (
    DEFAULT_LIMITS,
    ConfigurationError,
    InvalidInputError,
    Settings,
    WardenError,
    load_settings,
    resolve_data_dir,
    validate_tag,
)
from warden.core.files import read_limited, write_file_atomic, write_private_file
from warden.hub import Hub, initialise
from warden.pki import Profile
from warden.policy import parse_role
from warden.provisioning import EnrollmentStatus
from warden.registry import CertificateStatus, CommandState, DeviceState, parse_reason

__all__ = ["app", "main", "run"]

app = typer.Typer(
    name="warden",
    help="Warden: zero-trust security control plane for IoT fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ca_app = typer.Typer(help="The certificate authority.", no_args_is_help=True)
group_app = typer.Typer(help="Device groups.", no_args_is_help=True)
device_app = typer.Typer(help="Devices and their lifecycle.", no_args_is_help=True)
cert_app = typer.Typer(help="Certificates: sign CSRs, renew, list, revoke.", no_args_is_help=True)
ocsp_app = typer.Typer(help="OCSP (RFC 6960).", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
enrollment_app = typer.Typer(help="Onboarding: enrollment groups and individual enrollments.", no_args_is_help=True)
enrollment_group_app = typer.Typer(help="Enrollment groups: trust a manufacturer CA.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens for the operator REST API.", no_args_is_help=True)
broker_app = typer.Typer(help="The embedded MQTT broker that warden serve runs.", no_args_is_help=True)
ingest_app = typer.Typer(help="What devices publish, as warden serve ingests it.", no_args_is_help=True)
enrollment_app.add_typer(enrollment_group_app, name="group")
for sub, name in (
    (enrollment_app, "enrollment"),
    (token_app, "token"),
    (broker_app, "broker"),
    (ingest_app, "ingest"),
    (ca_app, "ca"),
    (group_app, "group"),
    (device_app, "device"),
    (cert_app, "cert"),
    (ocsp_app, "ocsp"),
    (audit_app, "audit"),
    (db_app, "db"),
):
    app.add_typer(sub, name=name)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
_SECRET_ENV = ("WARDEN_CA_PASSPHRASE", "WARDEN_PKCS11_PIN")


class _State:
    data_dir: Path = Path("warden-data")
    settings: Settings | None = None
    hub: Hub | None = None


_state = _State()


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid-{os.getuid()}"


def _settings() -> Settings:
    if _state.settings is None:
        _state.settings = load_settings(_state.data_dir)
        # Secrets were read into the settings: child processes must not inherit them.
        for name in _SECRET_ENV:
            os.environ.pop(name, None)
    return _state.settings


def _hub() -> Hub:
    if _state.hub is None:
        _state.hub = Hub.open(_settings())
    return _state.hub


@app.callback()
def _root(
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data directory (default: $WARDEN_DATA_DIR or ./warden-data)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _state.data_dir = resolve_data_dir(data_dir, os.environ)


def _read_input(path: Path, limit: int, what: str) -> bytes:
    if str(path) == "-":
        data = sys.stdin.buffer.read(limit + 1)
        if len(data) > limit:
            raise InvalidInputError(f"{what} on standard input is larger than the limit of {limit} bytes")
        return data
    return read_limited(path, limit, what=what)


def _check_out(path: Path) -> Path:
    """Refuse an output path that cannot be written before anything is issued or recorded: the file is written
    after the transaction commits, and a certificate must not exist in the registry without its file."""
    parent = path.absolute().parent
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory", hint="give a file name for --out")
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {path}: its directory does not exist")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"cannot write {path}: its directory is not writable")
    return path


def _parse_serial(text: str) -> int:
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,42}", cleaned):
        raise InvalidInputError(
            f"invalid serial {text[:60]!r}", hint="give the serial in hex, as 'warden cert list' shows"
        )
    return int(cleaned, 16)


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for text in tags or []:
        key, value = validate_tag(text)
        if key in result:
            raise InvalidInputError(f"tag {key!r} is given twice")
        result[key] = value
    return result


# -- init and CA ------------------------------------------------------------------------------------------------


@app.command()
def init(
    org: Annotated[str, typer.Option("--org", help="Organisation name, put into the CA certificates.")],
    fleet_domain: Annotated[
        str, typer.Option("--fleet-domain", help="DNS domain of the fleet, e.g. fleet.example.com.")
    ],
    key_store: Annotated[
        str, typer.Option("--key-store", help="'file' (encrypted PKCS#8) or an RFC 7512 'pkcs11:' URI.")
    ] = "file",
    key_algorithm: Annotated[str, typer.Option("--key-algorithm", help="P-256 or P-384.")] = "P-256",
    public_url: Annotated[
        str, typer.Option("--public-url", help="Base URL of the hub; puts CRL and OCSP URLs into certificates.")
    ] = "",
) -> None:
    """Create the data directory: settings, database, root and issuing CA, audit log."""
    result = initialise(
        _state.data_dir,
        org=org,
        fleet_domain=fleet_domain,
        key_store=key_store,
        key_algorithm=key_algorithm,
        public_url=public_url,
        actor=_actor(),
    )
    for name in _SECRET_ENV:
        os.environ.pop(name, None)
    typer.echo(f"initialised {_state.data_dir}")
    typer.echo(f"root CA:    {result.root.subject.rfc4514_string()} (serial {result.root.serial_number:X})")
    typer.echo(f"issuing CA: {result.issuing.subject.rfc4514_string()} (serial {result.issuing.serial_number:X})")
    if result.passphrase_file is not None:
        typer.echo(
            f"warning: the CA passphrase was generated into {result.passphrase_file} (mode 0600). That is for a "
            "single-box setup only: for production keep it elsewhere and pass it as WARDEN_CA_PASSPHRASE, or use a "
            "PKCS#11 token.",
            err=True,
        )


@ca_app.command("show")
def ca_show(as_json: JsonOpt = False) -> None:
    """Show the root and issuing CA."""
    info = _hub().ca_info()

    def describe(cert: x509.Certificate) -> dict[str, object]:
        key = cert.public_key()
        return {
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:X}",
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "key": key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__,
        }

    data = {
        "root": describe(info.root) | {"key_on_hub": info.root_key_present},
        "issuing": describe(info.issuing),
        "key_store": info.key_store,
        "fleet_domain": _settings().fleet_domain,
        "org": _settings().org,
    }
    if as_json:
        emit_json(data)
        return
    for role in ("root", "issuing"):
        entry = data[role]
        assert isinstance(entry, dict)
        typer.echo(f"{role} CA: {entry['subject']}")
        typer.echo(f"  serial {entry['serial']}, {entry['key']}, valid {entry['not_before']} .. {entry['not_after']}")
    typer.echo(f"root key on this hub: {'yes' if info.root_key_present else 'no (exported for offline storage)'}")
    typer.echo(f"key store: {info.key_store}; fleet domain: {data['fleet_domain']}")


@ca_app.command("export-chain")
def ca_export_chain(
    out: Annotated[Path, typer.Option("--out", help="File to write the PEM chain to.")],
) -> None:
    """Write the CA chain (issuing CA, then root) as PEM."""
    write_file_atomic(out, _hub().chain_pem())
    typer.echo(f"wrote the CA chain to {out}")


@ca_app.command("export-root")
def ca_export_root(
    out: Annotated[Path, typer.Option("--out", help="File for the root certificate and key.")],
) -> None:
    """Export the root CA (certificate and encrypted key) for offline storage and remove its key from the hub."""
    _hub().export_root(out, actor=_actor())
    typer.echo(f"exported the root CA to {out} (key encrypted with the CA passphrase); removed its key from the hub")
    typer.echo("store that file offline; the hub keeps issuing with the issuing CA")


# -- groups -----------------------------------------------------------------------------------------------------


@group_app.command("add")
def group_add(
    name: str,
    description: Annotated[str, typer.Option("--description", help="Free text.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create a device group."""
    group = _hub().devices.add_group(name, actor=_actor(), description=description)
    if as_json:
        emit_json(group_json(group, 0))
    else:
        typer.echo(f"added group {group.name}")


@group_app.command("list")
def group_list(as_json: JsonOpt = False) -> None:
    """List device groups."""
    groups = _hub().devices.list_groups()
    if as_json:
        emit_json([group_json(g, n) for g, n in groups])
    else:
        table(["name", "devices", "description"], [(g.name, n, g.description) for g, n in groups])


@group_app.command("show")
def group_show(name: str, as_json: JsonOpt = False) -> None:
    """Show one device group."""
    group, members = _hub().devices.get_group(name)
    if as_json:
        emit_json(group_json(group, members))
    else:
        typer.echo(f"group {group.name}: {members} device(s)")
        typer.echo(f"  description: {group.description}")
        typer.echo(f"  created: {group.created_at.isoformat()}")
        typer.echo(f"  settings: {dict(group.settings)}")


# -- devices ----------------------------------------------------------------------------------------------------


@device_app.command("add")
def device_add(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str, typer.Option("--name", help="Display name.")] = "",
    group: Annotated[list[str] | None, typer.Option("--group", help="Device group (repeatable).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device (state: pending)."""
    device = _hub().devices.add_device(
        device_id, actor=_actor(), display_name=name, groups=group or [], tags=_parse_tags(tag)
    )
    if as_json:
        emit_json(device_json(device))
    else:
        typer.echo(f"added device {device.id} ({device.state})")


@device_app.command("list")
def device_list(
    state: Annotated[str | None, typer.Option("--state", help="Only devices in this state.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Only members of this group.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Only devices with key=value (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List devices."""
    try:
        wanted = DeviceState(state) if state else None
    except ValueError:
        choices = ", ".join(s.value for s in DeviceState)
        raise InvalidInputError(f"unknown state {state!r}", hint=f"use one of: {choices}") from None
    devices = _hub().devices.list_devices(state=wanted, group=group, tags=_parse_tags(tag))
    if as_json:
        emit_json([device_json(d) for d in devices])
    else:
        table(
            ["id", "state", "groups", "tags", "name"],
            [
                (
                    d.id,
                    d.state,
                    ",".join(d.groups),
                    ",".join(f"{k}={v}" for k, v in d.tags.items()),
                    d.display_name,
                )
                for d in devices
            ],
        )


@device_app.command("show")
def device_show(device_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False) -> None:
    """Show one device: its certificates, its activity (last seen, messages, telemetry summary, last health and
    event) and any restriction."""
    hub = _hub()
    device = hub.devices.get_device(device_id)
    certs = hub.certificates.find(device_id=device_id)
    activity = hub.device_activity(device_id)
    restriction = hub.devices.get_restriction(device_id)
    if as_json:
        emit_json(
            device_json(device)
            | {
                "certificates": [certificate_json(c) for c in certs],
                "last_seen": activity.last_seen.isoformat() if activity else None,
                "activity": activity.to_json() if activity else None,
                "restriction": restriction_json(restriction) if restriction else None,
            }
        )
        return
    typer.echo(f"device {device.id} ({device.display_name}): {device.state}")
    typer.echo(f"  groups: {', '.join(device.groups) or '-'}")
    typer.echo(f"  tags: {', '.join(f'{k}={v}' for k, v in device.tags.items()) or '-'}")
    typer.echo(f"  onboarding identity: {device.onboarding_fingerprint or '-'}")
    if device.enrollment_group:
        typer.echo(f"  enrollment group: {device.enrollment_group}")
    typer.echo(f"  created {device.created_at.isoformat()}, updated {device.updated_at.isoformat()}")
    for c in certs:
        typer.echo(f"  certificate {c.serial_hex} {c.profile} {c.status} until {c.not_after.isoformat()}")
    if restriction is not None:
        until = restriction.until.isoformat(timespec="seconds") if restriction.until else "an operator lifts it"
        details = ", ".join(f"{k} {v}" for k, v in sorted(restriction.details.items()))
        typer.echo(f"  RESTRICTED ({restriction.reason}{': ' + details if details else ''}) until {until}")
        typer.echo(f"    lift it: warden device unrestrict {device.id}")
    if activity is None:
        typer.echo("  last seen: never")
        return
    typer.echo(f"  last seen: {activity.last_seen.isoformat(timespec='seconds')}")
    typer.echo(
        f"  messages: telemetry {activity.telemetry}, health {activity.health}, events {activity.events}; "
        f"duplicates {activity.duplicates}, malformed {activity.malformed}"
        + (f"; sequence {activity.seq}" if activity.seq is not None else "")
    )
    if activity.malformed:
        typer.echo(f"  last malformed: {activity.last_malformed_reason}")
    if activity.health_status is not None:
        # A check's result is the device's own text: shown escaped, never as terminal control sequences.
        checks = ", ".join(f"{k}={_shown(v)}" for k, v in sorted(activity.health_checks.items())[:20])
        typer.echo(f"  health: {activity.health_status}{' (' + checks + ')' if checks else ''}")
    if activity.last_event_type is not None:
        typer.echo(f"  last event: {activity.last_event_type}")
    for name, m in sorted(activity.metrics.items()):
        typer.echo(f"  telemetry {name}: last {m.last:g}, min {m.min:g}, max {m.max:g} ({m.count} readings)")


def _shown(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


def _transition(device_id: str, target: DeviceState, reason: str) -> None:
    hub = _hub()
    device = hub.devices.change_state(device_id, target, actor=_actor(), reason=reason)
    # A running hub's broker applies it now (reconciliation would within a jobs interval).
    hub.apply_device_access(device.id)
    typer.echo(f"device {device.id} is now {device.state}")


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]


@device_app.command("disable")
def device_disable(device_id: Annotated[str, typer.Argument(metavar="ID")], reason: ReasonOpt = "") -> None:
    """active -> disabled."""
    _transition(device_id, DeviceState.DISABLED, reason)


@device_app.command("enable")
def device_enable(device_id: Annotated[str, typer.Argument(metavar="ID")], reason: ReasonOpt = "") -> None:
    """disabled or quarantined -> active."""
    _transition(device_id, DeviceState.ACTIVE, reason)


@device_app.command("quarantine")
def device_quarantine(device_id: Annotated[str, typer.Argument(metavar="ID")], reason: ReasonOpt = "") -> None:
    """active -> quarantined."""
    _transition(device_id, DeviceState.QUARANTINED, reason)


@device_app.command("decommission")
def device_decommission(device_id: Annotated[str, typer.Argument(metavar="ID")], reason: ReasonOpt = "") -> None:
    """Any state -> decommissioned (final); revokes every certificate of the device."""
    _transition(device_id, DeviceState.DECOMMISSIONED, reason)


@device_app.command("unrestrict")
def device_unrestrict(device_id: Annotated[str, typer.Argument(metavar="ID")], reason: ReasonOpt = "") -> None:
    """Lift a device's restriction (e.g. for flooding): it gets the broker rights of its state again at once."""
    _hub().unrestrict_device(device_id, actor=_actor(), reason=reason)
    typer.echo(f"device {device_id} is no longer restricted")


@device_app.command("command")
def device_command(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="ping, report-health or renew-certificate.")],
    wait: Annotated[
        float, typer.Option("--wait", min=0, max=600, help="Seconds to wait for the device's answer (0: do not).")
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Send a signed command to a device (delivered by a running hub over its broker link; the device verifies the
    signature and a per-device counter, and reports the result)."""
    hub = _hub()
    command = hub.commands.send(device_id, name, actor=_actor())
    deadline = time.monotonic() + wait
    while wait and command.state in (CommandState.PENDING, CommandState.SENT) and time.monotonic() < deadline:
        time.sleep(0.2)
        command = hub.commands.get(command.id)
    if as_json:
        emit_json(command.to_json())
        return
    typer.echo(f"command {command.id} ({name}, counter {command.counter}) for {device_id}: {command.state}")
    if command.result:
        typer.echo(f"device answered: {command.result}")
    if wait and command.state in (CommandState.PENDING, CommandState.SENT):
        raise typer.Exit(4)


@device_app.command("commands")
def device_commands(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """The device's latest commands: counter, state, result."""
    records = _hub().commands.list(device_id, limit=limit)
    if as_json:
        emit_json([c.to_json() for c in records])
        return
    table(
        ["counter", "id", "name", "state", "created", "result"],
        [[c.counter, c.id, c.name, c.state, f"{c.created_at:%Y-%m-%d %H:%M:%S}", c.result or ""] for c in records],
    )


@device_app.command("rebind")
def device_rebind(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    fingerprint: Annotated[str, typer.Option("--fingerprint", help="SHA-256 of the new onboarding identity.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; audited).")],
) -> None:
    """Bind a device to a new onboarding identity (after a repair)."""
    device = _hub().devices.rebind_onboarding(device_id, fingerprint.lower(), actor=_actor(), reason=reason)
    typer.echo(f"device {device.id} is now bound to onboarding identity {device.onboarding_fingerprint}")


# -- certificates -----------------------------------------------------------------------------------------------

CsrOpt = Annotated[Path, typer.Option("--csr", help="PKCS#10 request, PEM or DER ('-' for stdin).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the PEM certificate.")]


@cert_app.command("sign")
def cert_sign(
    csr: CsrOpt,
    out: OutOpt,
    device: Annotated[str | None, typer.Option("--device", help="Device id.")] = None,
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="DNS name for service/hub-client profiles (repeatable)."),
    ] = None,
    profile: Annotated[str, typer.Option("--profile", help="device, gateway, service or hub-client.")] = "device",
    as_json: JsonOpt = False,
) -> None:
    """Issue a certificate from a CSR (the hub never sees the device's private key)."""
    try:
        chosen = Profile(profile)
    except ValueError:
        raise InvalidInputError(
            f"unknown profile {profile!r}", hint="use device, gateway, service or hub-client"
        ) from None
    _check_out(out)
    data = _read_input(csr, DEFAULT_LIMITS.max_csr_bytes, "the CSR")
    if (device is None) == (not name):
        raise InvalidInputError("give either --device ID or --name DNS-NAME")
    if device is not None:
        issued = _hub().certificates.sign(device_id=device, csr=data, actor=_actor(), profile=chosen)
    else:
        issued = _hub().certificates.issue_service(names=tuple(name or ()), csr=data, actor=_actor(), profile=chosen)
    write_file_atomic(out, issued.pem)
    if as_json:
        emit_json(certificate_json(issued.record))
    else:
        typer.echo(f"issued certificate {issued.record.serial_hex} for {issued.record.common_name} to {out}")


@cert_app.command("renew")
def cert_renew(
    device: Annotated[str, typer.Option("--device", help="Device id.")],
    csr: CsrOpt,
    out: OutOpt,
    revoke_superseded: Annotated[
        bool,
        typer.Option("--revoke-superseded", help="Revoke the device's earlier certificates (superseded)."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Issue a renewed certificate for an active device from a new CSR."""
    _check_out(out)
    data = _read_input(csr, DEFAULT_LIMITS.max_csr_bytes, "the CSR")
    issued = _hub().certificates.renew(device_id=device, csr=data, actor=_actor(), revoke_superseded=revoke_superseded)
    write_file_atomic(out, issued.pem)
    if as_json:
        emit_json(certificate_json(issued.record))
    else:
        typer.echo(f"renewed: certificate {issued.record.serial_hex} for {device} written to {out}")


@cert_app.command("list")
def cert_list(
    device: Annotated[str | None, typer.Option("--device", help="Only this device's certificates.")] = None,
    status: Annotated[str | None, typer.Option("--status", help="good or revoked.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List issued certificates."""
    try:
        wanted = CertificateStatus(status) if status else None
    except ValueError:
        raise InvalidInputError(f"unknown status {status!r}", hint="use good or revoked") from None
    records = _hub().certificates.find(device_id=device, status=wanted)
    if as_json:
        emit_json([certificate_json(r) for r in records])
    else:
        table(
            ["serial", "subject", "profile", "status", "not_after", "reason"],
            [
                (
                    r.serial_hex,
                    r.common_name,
                    r.profile,
                    r.status,
                    r.not_after.isoformat(),
                    r.revocation_reason,
                )
                for r in records
            ],
        )


@cert_app.command("show")
def cert_show(serial: str, as_json: JsonOpt = False) -> None:
    """Show one certificate (with its PEM)."""
    record = _hub().certificates.get(_parse_serial(serial))
    if as_json:
        emit_json(certificate_json(record, with_pem=True))
        return
    for key, value in certificate_json(record).items():
        typer.echo(f"{key}: {value}")
    typer.echo(record.pem.rstrip())


@cert_app.command("revoke")
def cert_revoke(
    serial: str,
    reason: Annotated[str, typer.Option("--reason", help="RFC 5280 reason, e.g. keyCompromise, superseded.")],
) -> None:
    """Revoke a certificate: a new CRL is published, a running broker reloads it and drops the device's session."""
    parsed = parse_reason(reason)
    hub = _hub()
    record = hub.certificates.revoke(_parse_serial(serial), reason=parsed, actor=_actor())
    hub.after_revocation(record, actor=_actor())
    typer.echo(f"revoked certificate {record.serial_hex} ({parsed})")


@app.command("crl")
def crl(
    out: Annotated[Path, typer.Option("--out", help="Where to write the CRL.")],
    der: Annotated[bool, typer.Option("--der", help="DER instead of PEM.")] = False,
) -> None:
    """Issue a new CRL, signed by the issuing CA."""
    _check_out(out)
    issued = _hub().certificates.issue_crl(actor=_actor())
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    write_file_atomic(out, issued.public_bytes(encoding))
    number = issued.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    typer.echo(f"wrote CRL number {number} with {len(issued)} entries to {out}")


@ocsp_app.command("respond")
def ocsp_respond(
    request: Annotated[Path, typer.Option("--request", help="DER OCSP request ('-' for stdin).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the DER OCSP response.")],
) -> None:
    """Answer one OCSP request with a response signed by the delegated OCSP signer."""
    _check_out(out)
    data = _read_input(request, DEFAULT_LIMITS.max_ocsp_request_bytes, "the OCSP request")
    response = _hub().certificates.ocsp_respond(data, actor=_actor())
    write_file_atomic(out, response)
    typer.echo(f"wrote the OCSP response to {out}")


# -- audit ------------------------------------------------------------------------------------------------------


def _parse_since(text: str) -> dt.datetime:
    match = re.fullmatch(r"(\d{1,6})([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{unit: int(match.group(1))})
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            f"invalid --since {text[:40]!r}", hint="use an ISO 8601 time or a duration such as 30m, 2h, 7d"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@audit_app.command("verify")
def audit_verify(as_json: JsonOpt = False) -> None:
    """Verify the whole audit chain and its signed checkpoints."""
    hub = _hub()
    with hub.db.transaction(readonly=True) as uow:
        report = hub.audit.verify(uow)
    if as_json:
        emit_json(
            {
                "ok": True,
                "records": report.records,
                "checkpoints": report.checkpoints,
                "last_checkpoint_seq": report.last_checkpoint_seq,
            }
        )
    else:
        typer.echo(
            f"audit log OK: {report.records} records, {report.checkpoints} signed checkpoint(s), "
            f"last at record {report.last_checkpoint_seq}"
        )


@audit_app.command("list")
def audit_list(
    since: Annotated[str | None, typer.Option("--since", help="ISO time or duration (30m, 2h, 7d).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=DEFAULT_LIMITS.max_audit_list)] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """List audit records, oldest first."""
    hub = _hub()
    since_time = _parse_since(since) if since else None
    with hub.db.transaction(readonly=True) as uow:
        records = list(uow.audit.records(since_time=since_time, limit=limit))
    if as_json:
        emit_json([audit_json(r) for r in records])
    else:
        table(
            ["seq", "time", "actor", "action", "target", "outcome"],
            [(r.seq, r.time.isoformat(timespec="seconds"), r.actor, r.action, r.target, r.outcome) for r in records],
        )


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign the current head of the audit chain."""
    hub = _hub()
    with hub.db.transaction() as uow:
        checkpoint = hub.audit.checkpoint(uow)
    typer.echo(f"signed checkpoint at record {checkpoint.seq} ({checkpoint.hash[:16]}...)")


# -- the hub server -----------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default: listen_host).")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="Port (default: listen_port).")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=64, help="Worker processes; more than one needs PostgreSQL.")
    ] = None,
) -> None:
    """Run the hub over HTTPS: EST, CRL and OCSP, the operator API, /healthz and /metrics."""
    from warden.api import serve as run_server

    settings = _settings()
    run_server(
        settings,
        host=host or settings.listen_host,
        port=settings.listen_port if port is None else port,
        workers=workers or settings.workers,
        announce=lambda line: typer.echo(line, err=True),
    )


# -- enrollment -------------------------------------------------------------------------------------------------


def _read_ids(path: Path | None) -> list[str]:
    if path is None:
        return []
    text = _read_input(path, 8 * 1024 * 1024, "the id list").decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _parse_duration(text: str) -> dt.timedelta:
    match = re.fullmatch(r"(\d{1,6})([mhd])", text.strip())
    if match is None:
        raise InvalidInputError(f"invalid duration {text[:30]!r}", hint="use e.g. 30m, 12h, 30d")
    value, unit = int(match.group(1)), match.group(2)
    return {"m": dt.timedelta(minutes=value), "h": dt.timedelta(hours=value), "d": dt.timedelta(days=value)}[unit]


@enrollment_group_app.command("add")
def enrollment_group_add(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    ca: Annotated[
        Path, typer.Option("--ca", help="PEM of the manufacturer CA that signs the onboarding certificates.")
    ],
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="k=v tag given to enrolled devices; repeatable.")
    ] = None,
    profile: Annotated[str, typer.Option("--profile", help="device or gateway.")] = "device",
    validity: Annotated[
        int | None, typer.Option("--validity", min=1, max=825, help="Days (default: the profile's).")
    ] = None,
    id_field: Annotated[str, typer.Option("--id-field", help="Where the device id is: cn or serial-number.")] = "cn",
    allow: Annotated[Path | None, typer.Option("--allow", help="File of device ids (one per line) allowed.")] = None,
    deny: Annotated[Path | None, typer.Option("--deny", help="File of device ids (one per line) refused.")] = None,
    flood_limit: Annotated[
        int | None,
        typer.Option(
            "--flood-limit",
            min=1,
            max=1_000_000,
            help="Messages/s (over the hub's flood window) above which a device of the group is restricted; "
            "default: the hub's ingest_flood_rate.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Trust a manufacturer CA: devices whose onboarding certificate chains to it enroll themselves."""
    group = _hub().provisioning.add_group(
        name,
        ca_pem=_read_input(ca, DEFAULT_LIMITS.max_pem_file_bytes, "the CA file"),
        actor=_actor(),
        id_field=id_field,
        profile=profile,
        validity_days=validity,
        tags=_parse_tags(tag),
        allow=_read_ids(allow),
        deny=_read_ids(deny),
        flood_limit=flood_limit,
    )
    if as_json:
        emit_json(enrollment_group_json(group))
    else:
        typer.echo(f"enrollment group {group.name} added (ids from {group.id_field}, profile {group.profile})")


@enrollment_group_app.command("list")
def enrollment_group_list(as_json: JsonOpt = False) -> None:
    """List enrollment groups."""
    groups = _hub().provisioning.list_groups()
    if as_json:
        emit_json([enrollment_group_json(g) for g in groups])
    else:
        table(
            ["name", "enabled", "id-field", "profile", "validity", "cas"],
            [
                (
                    g.name,
                    "yes" if g.enabled else "no",
                    str(g.id_field),
                    g.profile,
                    g.validity_days or "-",
                    len(g.ca_fingerprints),
                )
                for g in groups
            ],
        )


@enrollment_group_app.command("show")
def enrollment_group_show(name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False) -> None:
    """Show one enrollment group."""
    group = _hub().provisioning.get_group(name)
    data = enrollment_group_json(group)
    if as_json:
        emit_json(data)
    else:
        for key, value in data.items():
            typer.echo(f"{key}: {value}")


@enrollment_group_app.command("disable")
def enrollment_group_disable(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Stop enrolling through a group (a running hub's TLS trust store follows within seconds)."""
    _hub().provisioning.set_group_enabled(name, False, actor=_actor())
    typer.echo(f"enrollment group {name} disabled")


@enrollment_group_app.command("flood-limit")
def enrollment_group_flood_limit(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    limit: Annotated[str, typer.Argument(metavar="LIMIT", help="Messages per second, or 'default'.")],
) -> None:
    """Set the flood limit of the group's devices (messages per second over the hub's flood window), or go back to
    the hub's default; the running ingest applies it within 30 seconds."""
    if limit == "default":
        value = None
    elif limit.isdigit() and len(limit) <= 7:
        value = int(limit)
    else:
        raise InvalidInputError(
            f"invalid flood limit {limit[:20]!r}", hint="a number of messages per second, or 'default'"
        )
    group = _hub().provisioning.set_group_flood_limit(name, value, actor=_actor())
    shown = f"{group.flood_limit} messages/s" if group.flood_limit else "the hub's default"
    typer.echo(f"enrollment group {name}: flood limit {shown}")


@enrollment_group_app.command("enable")
def enrollment_group_enable(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Enroll through a disabled group again."""
    _hub().provisioning.set_group_enabled(name, True, actor=_actor())
    typer.echo(f"enrollment group {name} enabled")


@enrollment_app.command("add")
def enrollment_add(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE-ID")],
    cert: Annotated[Path | None, typer.Option("--cert", help="The device's onboarding certificate (PEM).")] = None,
    token: Annotated[bool, typer.Option("--token", help="Issue a one-time enrollment token instead.")] = False,
    expires: Annotated[str, typer.Option("--expires", help="Token lifetime, e.g. 12h or 7d.")] = "",
    profile: Annotated[str, typer.Option("--profile", help="device or gateway.")] = "device",
    validity: Annotated[int | None, typer.Option("--validity", min=1, max=825, help="Days.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Enroll one device: bind it to an onboarding certificate, or give it a one-time token (shown once)."""
    if (cert is None) == (not token):
        raise InvalidInputError("give either --cert FILE or --token")
    provisioning = _hub().provisioning
    if cert is not None:
        enrollment = provisioning.add_certificate_enrollment(
            device_id,
            certificate_pem=_read_input(cert, DEFAULT_LIMITS.max_pem_file_bytes, "the certificate"),
            actor=_actor(),
            profile=profile,
            validity_days=validity,
        )
        if as_json:
            emit_json(enrollment_json(enrollment))
        else:
            typer.echo(f"enrollment {enrollment.id}: {device_id} bound to {enrollment.certificate_fingerprint}")
        return
    enrollment, secret = provisioning.add_token_enrollment(
        device_id,
        actor=_actor(),
        expires_in=_parse_duration(expires) if expires else None,
        profile=profile,
        validity_days=validity,
    )
    if as_json:
        emit_json({**enrollment_json(enrollment), "token": str(secret)})
    else:
        typer.echo(f"enrollment {enrollment.id} for {device_id}, expires {enrollment.expires_at}")
        typer.echo("token (shown once, single use):")
        typer.echo(str(secret))


@enrollment_app.command("list")
def enrollment_list(
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    status: Annotated[str | None, typer.Option("--status", help="active, used or revoked.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List individual enrollments."""
    try:
        wanted = EnrollmentStatus(status) if status else None
    except ValueError:
        raise InvalidInputError(f"unknown status {status!r}", hint="use active, used or revoked") from None
    found = _hub().provisioning.list_enrollments(device_id=device, status=wanted)
    if as_json:
        emit_json([enrollment_json(e) for e in found])
    else:
        table(
            ["id", "device", "kind", "status", "expires"],
            [
                (e.id, e.device_id, str(e.kind), str(e.status), e.expires_at.isoformat() if e.expires_at else "-")
                for e in found
            ],
        )


@enrollment_app.command("revoke")
def enrollment_revoke(enrollment_id: Annotated[str, typer.Argument(metavar="ENROLLMENT-ID")]) -> None:
    """Revoke an individual enrollment (its token or certificate no longer onboards)."""
    enrollment = _hub().provisioning.revoke_enrollment(enrollment_id, actor=_actor())
    typer.echo(f"enrollment {enrollment.id} of {enrollment.device_id} revoked")


@enrollment_app.command("rearm")
def enrollment_rearm(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE-ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")] = "",
) -> None:
    """Allow one more onboarding of an enrolled device whose operational certificate was lost or expired. The next
    onboarding revokes its earlier certificates."""
    entry = _hub().provisioning.rearm(device_id, actor=_actor(), reason=reason)
    typer.echo(f"re-onboarding of {device_id} armed until {entry.expires_at.isoformat(timespec='seconds')}")


@enrollment_app.command("rebind")
def enrollment_rebind(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE-ID")],
    cert: Annotated[Path, typer.Option("--cert", help="The device's new onboarding certificate (PEM).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required, audited).")],
) -> None:
    """Bind a device to a new onboarding certificate (after a repair that replaced its IDevID)."""
    device = _hub().provisioning.rebind(
        device_id,
        certificate_pem=_read_input(cert, DEFAULT_LIMITS.max_pem_file_bytes, "the certificate"),
        actor=_actor(),
        reason=reason,
    )
    typer.echo(f"device {device.id} bound to onboarding identity {device.onboarding_fingerprint}")


def _has_token_rows(data: bytes) -> bool:
    """Whether a CSV import has enrollment=token rows, whose new tokens need --tokens-out (a file that does not parse
    is refused by the import itself, before any token is made)."""
    try:
        rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        return any((row.get("enrollment") or "").strip() == "token" for row in rows)
    except (UnicodeDecodeError, csv.Error):
        return False


@device_app.command("import")
def device_import(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="CSV with a device_id column ('-' for stdin).")],
    tokens_out: Annotated[
        Path | None, typer.Option("--tokens-out", help="Write the tokens of enrollment=token rows here (0600).")
    ] = None,
) -> None:
    """Register devices (and their certificate or token enrollments) from CSV; all rows or none."""
    if tokens_out is not None:
        _check_out(tokens_out)
        if tokens_out.exists():
            raise InvalidInputError(f"{tokens_out} exists already", hint="choose a new file for the tokens")
    data = _read_input(path, DEFAULT_LIMITS.max_csv_bytes, "the CSV file")
    if tokens_out is None and _has_token_rows(data):
        raise InvalidInputError("rows with enrollment=token need --tokens-out FILE for their tokens")
    count, tokens = _hub().provisioning.import_csv(data, actor=_actor())
    if tokens and tokens_out is not None:
        write_private_file(tokens_out, "".join(f"{d},{t}\n" for d, t in tokens).encode("ascii"))
    typer.echo(f"imported {count} device(s), {len(tokens)} token(s)")


@device_app.command("export")
def device_export(
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of standard output.")] = None,
) -> None:
    """Export every device with its active enrollment as CSV (tokens are never exported)."""
    if out is not None:
        _check_out(out)
    text = _hub().provisioning.export_csv()
    if out is None:
        sys.stdout.write(text)
    else:
        write_file_atomic(out, text.encode("utf-8"))


# -- API tokens -------------------------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="viewer, operator, security-admin or auditor.")],
    expires: Annotated[str, typer.Option("--expires", help="Lifetime, e.g. 12h or 30d.")] = "30d",
    name: Annotated[str, typer.Option("--name", help="A name to recognise it by.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create an API token; it is shown once."""
    record, secret = _hub().tokens.create(
        role=parse_role(role), expires_in=_parse_duration(expires), actor=_actor(), name=name
    )
    if as_json:
        emit_json({**token_json(record), "token": str(secret)})
    else:
        typer.echo(f"token {record.id} ({record.role}), expires {record.expires_at.isoformat(timespec='seconds')}")
        typer.echo("token (shown once):")
        typer.echo(str(secret))


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """List API tokens (never their secrets)."""
    tokens = _hub().tokens.list()
    if as_json:
        emit_json([token_json(t) for t in tokens])
    else:
        table(
            ["id", "name", "role", "expires", "revoked"],
            [
                (t.id, t.name, str(t.role), t.expires_at.isoformat(timespec="seconds"), "yes" if t.revoked_at else "no")
                for t in tokens
            ],
        )


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(metavar="TOKEN-ID")]) -> None:
    """Revoke an API token at once."""
    _hub().tokens.revoke(token_id, actor=_actor())
    typer.echo(f"token {token_id} revoked")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database schema to this version of Warden."""
    from warden.hub import migrate_database

    revision = migrate_database(_settings())
    typer.echo(f"database at revision {revision}")


# -- the embedded broker ----------------------------------------------------------------------------------------


@broker_app.command("status")
def broker_status(json_out: JsonOpt = False) -> None:
    """Whether the broker of a running 'warden serve' is up, where it listens, and which devices it holds as
    exceptions (quarantined, disabled) next to what the registry says."""
    hub = _hub()
    broker = hub.local_broker()
    if broker is None:
        status: dict[str, object] = {"broker": "off"}
    else:
        up = broker.is_up()
        held = broker.exception_clients() if up else {}
        wanted = hub.broker_exceptions()
        status = {
            "broker": "local",
            "listener": f"mqtts://{broker.host}:{broker.port}",
            "running": up,
            "log": str(broker.layout.log),
            "exceptions_held": sorted(held),
            "exceptions_in_registry": {d: str(a) for d, a in sorted(wanted.items())},
            "in_line_with_registry": up and sorted(held) == sorted(wanted),
        }
    if json_out:
        emit_json(status)
        return
    if status["broker"] == "off":
        typer.echo("broker: off (WARDEN_BROKER=off)")
        return
    typer.echo(f"broker: {'running' if status['running'] else 'not running'} on {status['listener']}")
    typer.echo(f"  log: {status['log']}")
    typer.echo(f"  devices held as exceptions: {len(held)}; in the registry: {len(wanted)}")
    if up and not status["in_line_with_registry"]:
        typer.echo("  differs from the registry: 'warden broker reconcile' repairs it (the server does every interval)")


@ingest_app.command("status")
def ingest_status(as_json: JsonOpt = False) -> None:
    """The ingest's totals since the database was created: messages processed and accepted, malformed, duplicates,
    from unknown devices, devices restricted for flooding, and the batches they were written in."""
    hub = _hub()
    settings = _settings()
    stats = hub.ingest_stats().to_json()
    restricted = hub.devices.list_restrictions()
    data = {
        **stats,
        "enabled": settings.hub_link and settings.broker == "local",
        "restricted_now": [r.device_id for r in restricted],
        "flood_limit": {
            "rate": settings.ingest_flood_rate,
            "window_seconds": settings.ingest_flood_window_seconds,
            "cooldown_seconds": settings.ingest_flood_cooldown_seconds,
        },
    }
    if as_json:
        emit_json(data)
        return
    typer.echo(f"ingest: {'on' if data['enabled'] else 'off'} (last batch written {stats['last_flush_at'] or 'never'})")
    typer.echo(f"  processed {stats['processed']}, accepted {stats['accepted']}")
    typer.echo(
        f"  malformed {stats['malformed']}, duplicates {stats['duplicates']}, from unknown devices "
        f"{stats['unknown_devices']}, dropped for overflow {stats['overflow']}"
    )
    typer.echo(
        f"  batches {stats['flushes']} (average {stats['average_batch']}, largest {stats['largest_batch']}, "
        f"last {stats['last_batch']} messages)"
    )
    typer.echo(
        f"  flood limit {settings.ingest_flood_rate:g} messages/s over {settings.ingest_flood_window_seconds:g} s; "
        f"restricted for flooding {stats['restricted_for_flooding']}, restricted now {len(restricted)}"
        + (f": {', '.join(r.device_id for r in restricted[:20])}" if restricted else "")
    )


@broker_app.command("reconcile")
def broker_reconcile() -> None:
    """Repair any difference between the running broker and the registry now (each repair is audited)."""
    hub = _hub()
    broker = hub.local_broker()
    if broker is None or not broker.is_up():
        raise ConfigurationError("no broker is running for this data directory", hint="start it with 'warden serve'")
    repairs = hub.reconcile_broker(actor=_actor())
    for repair in repairs:
        typer.echo(f"repaired: {repair}")
    typer.echo(f"{len(repairs)} repair(s)")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return its exit status; every :class:`WardenError` becomes one line on stderr."""
    global _state
    _state = _State()
    try:
        app(args=argv, standalone_mode=False)
    except WardenError as e:
        typer.echo(f"error: {e.diagnostics()}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    except typer.exceptions.TyperException as e:
        # Usage errors: typer prints the usage and the problem, as in standalone mode.
        show = getattr(e, "show", None)
        if callable(show):
            show()
        return int(getattr(e, "exit_code", 2))
    finally:
        if _state.hub is not None:
            _state.hub.close()
    return 0


@app.command(
    "agent",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="The device agent (installed alone as warden-agent): run, enroll, status. See docs/agent.md.",
)
def agent(ctx: typer.Context) -> None:
    from warden.agent._cli import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


@app.command(
    "simulate",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="A simulated factory and fleet of N real agents against a hub (warden simulate --help).",
)
def simulate(ctx: typer.Context) -> None:
    from warden.agent._cli import main as agent_main

    raise typer.Exit(agent_main(["simulate", *ctx.args]))


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option("--devices", min=3, max=200, help="Simulated devices.")] = 20,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Leave the hub and its data directory up afterwards.")
    ] = False,
) -> None:
    """Start a hub on embedded defaults (SQLite, local Mosquitto) with a simulated fleet, then contain an impostor."""
    from warden.cli._demo import run_demo

    raise typer.Exit(run_demo(devices=devices, keep_running=keep_running))


def main() -> NoReturn:
    sys.exit(run())

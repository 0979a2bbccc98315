"""agent.toml: a valid file loads with its relative paths resolved against the file's directory; every invalid
file is a ConfigurationError whose message names the file, the place and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from warden.agent import AgentConfig, load_config
from warden.agent._config import MAX_CONFIG_BYTES
from warden.core import ConfigurationError

HUB = """
[hub]
url = "https://hub.fleet.test:8443"
ca = "hub-root.pem"
"""
BROKER = """
[broker]
host = "broker.fleet.test"
"""
TOKEN = """
[onboarding]
token_file = "enroll.token"
"""
CERTIFICATE = """
[onboarding]
certificate = "idevid.pem"
key = "idevid.key"
"""


def write(directory: Path, text: str, name: str = "agent.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def minimal(*, top: str = 'device_id = "sensor-0001"', sections: str = HUB + BROKER + TOKEN) -> str:
    return f'state_dir = "state"\n{top}\n{sections}'


def error(path: Path) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    return info.value


def test_a_minimal_file_with_a_token_loads_with_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()))
    assert isinstance(config, AgentConfig)
    assert config.device_id == "sensor-0001"
    assert config.state_dir == tmp_path.resolve() / "state"
    assert config.hub.ca == tmp_path.resolve() / "hub-root.pem"
    assert config.onboarding.token_file == tmp_path.resolve() / "enroll.token"
    assert config.onboarding.certificate is None
    assert config.keystore.kind == "file"
    assert config.broker.port == 8883
    assert config.broker.keepalive_seconds == 30
    assert config.queue == "file"
    assert config.queue_limit == 10_000
    assert config.renew_at == pytest.approx(2 / 3)
    assert config.jitter_fraction == 0.05
    assert config.hub.timeout_seconds == 30.0


def test_a_minimal_file_with_an_onboarding_certificate_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal(top="", sections=HUB + BROKER + CERTIFICATE)))
    assert config.device_id is None  # taken from the certificate's CN when the agent starts
    assert config.onboarding.certificate == tmp_path.resolve() / "idevid.pem"
    assert config.onboarding.key == tmp_path.resolve() / "idevid.key"
    assert config.onboarding.token_file is None


def test_the_hub_url_gives_host_port_and_path(tmp_path: Path) -> None:
    sections = HUB.replace("https://hub.fleet.test:8443", "https://hub.fleet.test:8443/warden/") + BROKER + TOKEN
    hub = load_config(write(tmp_path, minimal(sections=sections))).hub
    assert (hub.host, hub.port, hub.path_prefix) == ("hub.fleet.test", 8443, "/warden")
    sections = HUB.replace("https://hub.fleet.test:8443", "https://hub.fleet.test") + BROKER + TOKEN
    hub = load_config(write(tmp_path, minimal(sections=sections))).hub
    assert (hub.host, hub.port, hub.path_prefix) == ("hub.fleet.test", 443, "")


def test_relative_paths_are_relative_to_the_files_directory_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc" / "warden"
    config_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = """
state_dir = "../../var/lib/agent"
[hub]
url = "https://hub.fleet.test"
ca = "pki/hub-root.pem"
[broker]
host = "broker.fleet.test"
[keystore]
kind = "pkcs11"
module = "lib/softhsm2.so"
token = "warden-device"
pin_file = "token.pin"
[onboarding]
certificate = "idevid.pem"
key_label = "idevid"
"""
    write(config_dir, text)
    config = load_config(Path("../etc/warden/agent.toml"))  # itself given relative to the working directory
    base = config_dir.resolve()
    assert config.state_dir == base / "../../var/lib/agent"
    assert config.state_dir.resolve() == (tmp_path / "var" / "lib" / "agent").resolve()
    assert config.hub.ca == base / "pki" / "hub-root.pem"
    assert config.keystore.module == base / "lib" / "softhsm2.so"
    assert config.keystore.pin_file == base / "token.pin"
    assert config.onboarding.certificate == base / "idevid.pem"
    assert config.onboarding.key_label == "idevid"  # a label, not a path
    assert config.keystore.token == "warden-device"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    text = f"""
state_dir = "/var/lib/warden-agent"
device_id = "sensor-0001"
[hub]
url = "https://hub.fleet.test"
ca = "/etc/warden/hub-root.pem"
[broker]
host = "broker.fleet.test"
[onboarding]
token_file = "{tmp_path / "enroll.token"}"
"""
    config = load_config(write(tmp_path, text))
    assert config.state_dir == Path("/var/lib/warden-agent")
    assert config.hub.ca == Path("/etc/warden/hub-root.pem")
    assert config.onboarding.token_file == tmp_path / "enroll.token"


# --- what is refused ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "sections", "expected"),
    [
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + CERTIFICATE + 'token_file = "enroll.token"\n',
            "onboarding: Value error, onboarding needs either certificate (with key or key_label) or token_file",
            id="both certificate and token",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + "[onboarding]\n",
            "onboarding: Value error, onboarding needs either certificate (with key or key_label) or token_file",
            id="neither certificate nor token",
        ),
        pytest.param(
            "",
            HUB + BROKER + '[onboarding]\ncertificate = "idevid.pem"\n',
            "onboarding: Value error, an onboarding certificate needs exactly one of key (a file) or key_label",
            id="certificate without key",
        ),
        pytest.param(
            "",
            HUB + BROKER + CERTIFICATE + 'key_label = "idevid"\n',
            "onboarding: Value error, an onboarding certificate needs exactly one of key (a file) or key_label",
            id="certificate with key and key_label",
        ),
        pytest.param(
            "",
            HUB + BROKER + TOKEN,
            "Value error, device_id is required when onboarding with an enrollment token",
            id="token without device_id",
        ),
        pytest.param(
            "",
            HUB + BROKER + '[onboarding]\ncertificate = "idevid.pem"\nkey_label = "idevid"\n',
            "Value error, onboarding.key_label needs keystore kind 'pkcs11'",
            id="key_label without pkcs11",
        ),
        pytest.param(
            "",
            HUB
            + BROKER
            + '[keystore]\nkind = "pkcs11"\nmodule = "/usr/lib/p11.so"\ntoken = "t"\npin_file = "pin"\n'
            + CERTIFICATE,
            "Value error, onboarding.key (a file) needs keystore kind 'file'; in a token use key_label",
            id="key file with pkcs11",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + '[keystore]\nkind = "pkcs11"\ntoken = "t"\npin_file = "pin"\n' + TOKEN,
            "keystore: Value error, keystore kind 'pkcs11' needs module, token and pin_file",
            id="pkcs11 without module",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + '[keystore]\nkind = "pkcs11"\nmodule = "/usr/lib/p11.so"\npin_file = "pin"\n' + TOKEN,
            "keystore: Value error, keystore kind 'pkcs11' needs module, token and pin_file",
            id="pkcs11 without token",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + '[keystore]\nkind = "pkcs11"\nmodule = "/usr/lib/p11.so"\ntoken = "t"\n' + TOKEN,
            "keystore: Value error, keystore kind 'pkcs11' needs module, token and pin_file",
            id="pkcs11 without pin_file",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + '[keystore]\nkind = "tpm"\n' + TOKEN,
            "keystore.kind: Input should be 'file' or 'pkcs11'",
            id="unknown keystore kind",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB.replace("https://", "http://") + BROKER + TOKEN,
            "hub: Value error, hub.url must be an https:// URL with a host name",
            id="http URL",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB.replace("https://hub.fleet.test:8443", "https:///est") + BROKER + TOKEN,
            "hub: Value error, hub.url must be an https:// URL with a host name",
            id="URL without host",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB.replace("https://hub.fleet.test:8443", "hub.fleet.test") + BROKER + TOKEN,
            "hub: Value error, hub.url must be an https:// URL with a host name",
            id="URL without scheme",
        ),
        pytest.param(
            'device_id = "sensor-0001"\ncolour = "blue"',
            HUB + BROKER + TOKEN,
            "colour: Extra inputs are not permitted",
            id="unknown top-level key",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + "verify = false\n" + BROKER + TOKEN,
            "hub.verify: Extra inputs are not permitted",
            id="unknown key in a section",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER + TOKEN + "[extras]\na = 1\n",
            "extras: Extra inputs are not permitted",
            id="unknown section",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + TOKEN,
            "broker: Field required",
            id="no broker section",
        ),
        pytest.param(
            'device_id = "sensor-0001"',
            HUB + BROKER.replace('host = "broker.fleet.test"', 'host = "b"\nport = 70000') + TOKEN,
            "broker.port: Input should be less than 65536",
            id="broker port out of range",
        ),
        pytest.param(
            'device_id = "sensor-0001"\nqueue_limit = 5',
            HUB + BROKER + TOKEN,
            "queue_limit: Input should be greater than or equal to 10",
            id="queue too small",
        ),
        pytest.param(
            'device_id = "sensor-0001"\nrenew_at = 0.99',
            HUB + BROKER + TOKEN,
            "renew_at: Input should be less than 0.95",
            id="renewal too late",
        ),
        pytest.param(
            'device_id = "sensor-0001"\njitter_fraction = 0.5',
            HUB + BROKER + TOKEN,
            "jitter_fraction: Input should be less than or equal to 0.2",
            id="too much jitter",
        ),
        pytest.param(
            'device_id = "sensor-0001"\nqueue = "disk"',
            HUB + BROKER + TOKEN,
            "queue: Input should be 'file' or 'memory'",
            id="unknown queue kind",
        ),
    ],
)
def test_an_invalid_configuration_says_where_and_why(tmp_path: Path, top: str, sections: str, expected: str) -> None:
    path = write(tmp_path, minimal(top=top, sections=sections))
    e = error(path)
    assert e.message.startswith(f"invalid agent configuration {path}: "), e.message
    assert expected in e.message, e.message


def test_several_problems_are_counted_in_the_hint(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = "state"\ncolour = "blue"\nsize = 3\n' + HUB + BROKER + TOKEN)
    e = error(path)
    assert e.hint == "2 problem(s) in all"  # the two unknown keys (the cross-field checks run only on valid fields)
    single = error(write(tmp_path, minimal(top='device_id = "sensor-0001"\ncolour = "blue"'), "single.toml"))
    assert single.hint is None


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert error(path).message == f"cannot read the agent configuration {path}: No such file or directory"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert error(tmp_path).message.startswith(f"cannot read the agent configuration {tmp_path}: ")


def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    text = minimal()
    padded = text + "#" * (MAX_CONFIG_BYTES - len(text.encode()))
    assert len(padded.encode()) == MAX_CONFIG_BYTES
    assert load_config(write(tmp_path, padded)).device_id == "sensor-0001"  # exactly the limit is fine
    path = write(tmp_path, padded + "#", "big.toml")
    assert error(path).message == f"the agent configuration {path} is larger than {MAX_CONFIG_BYTES} bytes"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('state_dir = "state\n', id="unterminated string"),
        pytest.param("state_dir = state", id="bare word"),
        pytest.param("[hub\nurl = 1", id="broken table"),
        pytest.param("a = 1\na = 2", id="duplicate key"),
    ],
)
def test_invalid_toml_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert error(path).message.startswith(f"the agent configuration {path} is not valid TOML: ")


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'state_dir = "\xff\xfe"\n')
    assert error(path).message.startswith(f"the agent configuration {path} is not valid TOML: ")


@pytest.mark.parametrize("device_id", ["Sensor/1", "a" * 64, "hub"])
def test_an_invalid_device_id_is_a_configuration_error(tmp_path: Path, device_id: str) -> None:
    path = write(tmp_path, minimal(top=f'device_id = "{device_id}"'))
    e = error(path)
    assert e.message.startswith(f"invalid agent configuration {path}: ")
    assert "device" in e.message


@pytest.mark.parametrize("url", ["https://hub.fleet.test:99999", "https://hub.fleet.test:port", "https://hub:-1"])
def test_a_hub_url_with_an_invalid_port_is_refused(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, minimal(sections=HUB.replace("https://hub.fleet.test:8443", url) + BROKER + TOKEN))
    e = error(path)
    assert e.message.startswith(f"invalid agent configuration {path}: hub"), e.message

from pathlib import Path

import pytest

from warden.core import ConfigurationError, load_settings, resolve_data_dir, write_settings_file


def test_precedence_env_over_file_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_settings_file(tmp_path / "warden.toml", {"org": "From File", "device_validity_days": 10})
    settings = load_settings(tmp_path)
    assert settings.org == "From File"
    assert settings.device_validity_days == 10
    assert settings.gateway_validity_days == 30  # default
    monkeypatch.setenv("WARDEN_DEVICE_VALIDITY_DAYS", "7")
    assert load_settings(tmp_path).device_validity_days == 7


def test_default_database_is_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = load_settings(tmp_path)
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'warden.db'}"


def test_data_dir_cli_beats_env(tmp_path: Path) -> None:
    env = {"WARDEN_DATA_DIR": str(tmp_path / "env")}
    assert resolve_data_dir(tmp_path / "cli", env) == tmp_path / "cli"
    assert resolve_data_dir(None, env) == tmp_path / "env"


def test_env_data_dir_does_not_override_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_DATA_DIR", str(tmp_path / "elsewhere"))
    assert load_settings(tmp_path).data_dir == tmp_path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"org = ", "not valid TOML"),
        (b"nonsense_key = 1\n", "invalid setting nonsense_key"),
        (b"device_validity_days = 100000\n", "invalid setting device_validity_days"),
        (b'fleet_domain = "not a domain"\n', "invalid setting fleet_domain"),
        (b"# " + b"x" * 70_000, "larger than"),
    ],
    ids=["truncated", "unknown key", "out of range", "bad domain", "oversized"],
)
def test_bad_settings_file(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "warden.toml").write_bytes(content)
    with pytest.raises(ConfigurationError, match=message):
        load_settings(tmp_path)


def test_passphrase_is_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_CA_PASSPHRASE", "very-secret-value")
    settings = load_settings(tmp_path)
    assert "very-secret-value" not in repr(settings)
    assert settings.ca_passphrase is not None
    assert settings.ca_passphrase.get_secret_value() == "very-secret-value"

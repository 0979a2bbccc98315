import pytest

from warden.core import InvalidInputError, validate_device_id, validate_dns_name, validate_fleet_domain, validate_tag

DEVICE_IDS = [
    ("single char", "a", True),
    ("digits and hyphen", "sensor-0042", True),
    ("63 chars", "a" * 63, True),
    ("64 chars is no DNS label", "a" * 64, False),
    ("empty", "", False),
    ("upper case", "Sensor-1", False),
    ("leading hyphen", "-sensor", False),
    ("trailing hyphen", "sensor-", False),
    ("dot", "sensor.1", False),
    ("underscore", "sensor_1", False),
    ("space", "sensor 1", False),
    ("idna prefix", "xn--abc", False),
    ("reserved hub", "hub", False),
    ("reserved broker", "broker", False),
    ("unicode", "sënsor", False),
    ("newline", "sensor\n", False),
]


@pytest.mark.parametrize(("value", "ok"), [(v, ok) for _, v, ok in DEVICE_IDS], ids=[n for n, _, _ in DEVICE_IDS])
def test_device_ids(value: str, ok: bool) -> None:
    if ok:
        assert validate_device_id(value) == value
    else:
        with pytest.raises(InvalidInputError):
            validate_device_id(value)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("hub.fleet.example.com", True),
        ("a.b", True),
        ("hub", False),  # a single label could be a device id
        ("hub..example.com", False),
        ("Hub.example.com", False),
        ("hub.example.123", False),
        ("x" * 64 + ".example.com", False),
        ("-hub.example.com", False),
    ],
)
def test_dns_names(value: str, ok: bool) -> None:
    if ok:
        assert validate_dns_name(value) == value
    else:
        with pytest.raises(InvalidInputError):
            validate_dns_name(value)


def test_fleet_domain_leaves_room_for_device_ids() -> None:
    assert validate_fleet_domain("Fleet.Example.COM") == "fleet.example.com"
    too_long = ".".join(["a" * 60] * 4)
    with pytest.raises(InvalidInputError, match="too long"):
        validate_fleet_domain(too_long)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("site=berlin", ("site", "berlin")), ("k=", ("k", "")), ("a.b/c=x=y", ("a.b/c", "x=y"))],
)
def test_tags(text: str, expected: tuple[str, str]) -> None:
    assert validate_tag(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=x", "bad key=1", "k=" + "v" * 257, "k=\x00"])
def test_bad_tags(text: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_tag(text)

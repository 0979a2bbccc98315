"""The hub link's own packet reading (whole packets from a buffer, PUBLISH handed to the ingest, PUBACKs collected)
and what it refuses to publish, without a broker: tests/integration/test_hub_ingest.py connects it to a real one."""

from __future__ import annotations

import ssl
import struct

import pytest
from paho.mqtt.enums import MQTTErrorCode

from warden.broker import MAX_MESSAGE_BYTES, HubLink, LinkOptions
from warden.broker._link import _Client
from warden.core import InvalidInputError


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def publish(topic: bytes, payload: bytes, *, qos: int = 1, mid: int = 7, properties: bytes = b"") -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    body += _varint(len(properties)) + properties + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


def options() -> LinkOptions:
    return LinkOptions(
        address=("127.0.0.1", 1),
        server_name="broker.fleet.example.com",
        client_id="hub.fleet.example.com",
        tls=ssl.create_default_context,
    )


class Feed:
    """A :class:`_Client` reading from bytes instead of a socket."""

    def __init__(self, data: bytes) -> None:
        self.delivered: list[tuple[bytes, bytes]] = []
        self.client = _Client(options(), lambda t, p: self.delivered.append((t, p)))
        self.client._rbuf = data

    def read_all(self) -> list[MQTTErrorCode]:
        codes = []
        while True:
            code = self.client._packet_read()
            codes.append(code)
            if code != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return codes

    @property
    def acks(self) -> bytes:
        return bytes(self.client._acks)


def test_publishes_reach_the_ingest_and_qos1_ones_are_acknowledged_together() -> None:
    data = (
        publish(b"warden/dev-a/telemetry", b'{"a":1}', mid=1)
        + publish(b"warden/dev-b/health", b"", qos=0)
        # Properties the hub ignores: a payload format indicator and a user property.
        + publish(b"warden/dev-c/events", b"x" * 300, mid=258, properties=b"\x01\x01&\x00\x01k\x00\x01v")
    )
    feed = Feed(data)
    codes = feed.read_all()
    assert codes[:3] == [MQTTErrorCode.MQTT_ERR_SUCCESS] * 3
    assert codes[3] != MQTTErrorCode.MQTT_ERR_SUCCESS  # the feed is empty (no socket to read more from)
    assert feed.delivered == [
        (b"warden/dev-a/telemetry", b'{"a":1}'),
        (b"warden/dev-b/health", b""),
        (b"warden/dev-c/events", b"x" * 300),
    ]
    assert feed.acks == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02"


def test_a_packet_split_over_reads_waits_for_its_end() -> None:
    packet = publish(b"warden/dev-a/telemetry", b"y" * 200)
    feed = Feed(packet[:5])
    assert feed.client._packet_read() != MQTTErrorCode.MQTT_ERR_SUCCESS  # nothing complete, nothing more to read
    assert feed.delivered == []
    feed.client._rbuf, feed.client._rpos = packet, 0
    assert feed.client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert feed.delivered == [(b"warden/dev-a/telemetry", b"y" * 200)]


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(b"\x32\x01\x00", id="topic length cut"),
        pytest.param(b"\x32\x05\x00\x01a\x00", id="packet id cut"),
        pytest.param(b"\x32\x06\x00\x01a\x00\x07\x05", id="properties longer than the packet"),
        pytest.param(b"\x32\x09\x00\x01a\x00\x07\xff\xff\xff\xff", id="property length of five bytes"),
        pytest.param(b"\x32\xff\xff\xff\xff\x01", id="remaining length of five bytes"),
    ],
)
def test_malformed_packets_end_the_connection(packet: bytes) -> None:
    feed = Feed(packet + b"\x00" * 16)
    assert feed.client._packet_read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert feed.delivered == []


def test_an_ingest_failure_loses_the_message_not_the_connection() -> None:
    def broken(topic: bytes, payload: bytes) -> None:
        raise RuntimeError("bug")

    client = _Client(options(), broken)
    client._rbuf = publish(b"warden/dev-a/telemetry", b"{}")
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client.delivery_errors == 1
    assert bytes(client._acks) == b"\x40\x02\x00\x07"


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        pytest.param("warden/dev-a/telemetry", b"{}", id="a topic devices publish on"),
        pytest.param("warden/+/commands", b"{}", id="a wildcard"),
        pytest.param("elsewhere", b"{}", id="outside the scheme"),
        pytest.param("warden/dev-a/commands", b"x" * (MAX_MESSAGE_BYTES + 1), id="too large"),
    ],
)
def test_the_hub_publishes_only_to_devices_commands_and_updates(topic: str, payload: bytes) -> None:
    link = HubLink(options(), deliver=lambda t, p: None)
    try:
        with pytest.raises(InvalidInputError):
            link.publish(topic, payload)
    finally:
        link.stop()

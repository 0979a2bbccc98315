"""The agent's MQTT 5 session with the broker: mutual TLS, its own topics only, at-least-once delivery from a queue.

One :class:`Session` is one TLS identity: after a renewal the agent opens a new session with the new certificate
and closes the old one. Messages live in the agent's :class:`~warden.agent._queue.MessageQueue` until the broker
acknowledges them (PUBACK), so a broker outage, a refused handshake or a renewal loses none: whatever was not
acknowledged is published again by the next connection. The broker answers a publish it does not allow (a
quarantined device's telemetry) with a PUBACK carrying a refusal reason code: that message is dropped and counted,
never retried. Subscriptions are made again on every CONNACK: a persistent session keeps no subscription that the
broker dropped while the device's rights were removed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from warden.agent._config import BrokerConfig
from warden.agent._queue import MessageQueue
from warden.broker import device_topic

__all__ = ["NamedAddressClient", "Session", "SessionState"]

_log = logging.getLogger("warden.agent.session")
#: QoS 1 messages in flight at once (the rest wait in the queue)
_WINDOW = 32


@dataclass
class SessionState:
    """What ``warden agent status`` shows about the broker connection."""

    connected: bool = False
    since: float | None = None
    connects: int = 0
    last_error: str | None = None
    delivered: int = 0
    refused: int = 0
    received: int = 0
    subscriptions: list[str] = field(default_factory=list)


class NamedAddressClient(mqtt.Client):
    """paho's client, connecting to ``address`` while verifying the broker's name (SNI and certificate)."""

    def __init__(self, address: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._warden_address = address

    def _create_socket_connection(self) -> socket.socket:
        sock = socket.create_connection((self._warden_address or self._host, self._port), timeout=self._connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class Session:
    def __init__(
        self,
        device_id: str,
        broker: BrokerConfig,
        context: ssl.SSLContext,
        queue: MessageQueue,
        *,
        on_message: Callable[[str, bytes], None],
        state: SessionState | None = None,
    ) -> None:
        self.device_id = device_id
        self.state = state or SessionState()
        self._broker = broker
        self._queue = queue
        self._on_message = on_message
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> queue id
        self._early: dict[int, bool] = {}  # PUBACKs that arrived before publish() returned: mid -> refused
        self._pumping = threading.Lock()
        self._pump_again = False
        self._closed = False
        self._topics = [device_topic(device_id, "commands"), device_topic(device_id, "updates")]
        client = NamedAddressClient(
            broker.address,
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=mqtt.MQTTv5,
        )
        client.tls_set_context(context)
        client.reconnect_delay_set(1, 60)
        client.max_inflight_messages_set(_WINDOW)
        client.on_connect = self._connected
        client.on_connect_fail = self._connect_failed
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_message = self._message
        self._client = client

    def start(self) -> None:
        """Connect in the background; paho's thread reconnects with backoff (1 to 60 s) until :meth:`close`."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._broker.session_expiry_seconds
        self._client.connect_async(
            self._broker.host,
            self._broker.port,
            keepalive=self._broker.keepalive_seconds,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (unacknowledged messages stay queued for the next session)."""
        with self._lock:
            self._closed = True
        self._client.disconnect()
        deadline = time.monotonic() + timeout
        while self._client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._client.loop_stop()
        self.state.connected = False

    @property
    def connected(self) -> bool:
        return self.state.connected

    def pump(self) -> None:
        """Publish queued messages up to the in-flight window (called when something was queued or acknowledged).

        paho calls its callbacks holding its own message lock, and ``publish`` takes that lock: so no lock of ours
        is held while calling paho, and a pump that finds another one running (possibly in paho's thread, inside a
        callback) only asks it to go round once more instead of waiting for it."""
        if not self._pumping.acquire(blocking=False):
            self._pump_again = True
            return
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping.release()
        if self._pump_again:  # asked for between the last round and the release
            self.pump()

    def _pump_once(self) -> None:
        with self._lock:
            if self._closed or not self.state.connected:
                return
            room = _WINDOW - len(self._inflight)
            busy = set(self._inflight.values())
        if room <= 0:
            return
        for item in self._queue.pending(room, exclude=busy):
            info = self._client.publish(item.topic, item.payload, qos=1)
            # NO_CONN: paho keeps the message and sends it after reconnecting, like one in flight.
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                break
            with self._lock:
                early = self._early.pop(info.mid, None)
                if early is None:
                    self._inflight[info.mid] = item.id
            if early is not None:  # its PUBACK came before we got here
                self._settle(item.id, early)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break

    def _settle(self, message_id: int, refused: bool) -> None:
        self._queue.ack(message_id)
        if refused:
            self.state.refused += 1
        else:
            self.state.delivered += 1

    # -- paho callbacks (its network thread) ------------------------------------------------------------------

    def _connected(self, client: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            self.state.last_error = f"the broker refused the connection: {reason}"
            _log.warning("broker refused the connection: %s", reason)
            return
        # What was in flight stays so: paho publishes it again itself (same packet ids) on this connection.
        self.state.connected = True
        self.state.since = time.time()
        self.state.connects += 1
        self.state.last_error = None
        client.subscribe([(topic, 1) for topic in self._topics])
        self.state.subscriptions = list(self._topics)
        _log.info("connected to the broker %s:%d as %s", self._broker.host, self._broker.port, self.device_id)
        self._guarded(self.pump)

    def _connect_failed(self, _c: mqtt.Client, _u: object) -> None:
        self.state.last_error = "cannot connect to the broker (TLS handshake or network): retrying"

    def _disconnected(self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        was = self.state.connected
        self.state.connected = False
        with self._lock:
            closed = self._closed
        if was and not closed:
            self.state.last_error = f"disconnected: {reason}"
            _log.warning("disconnected from the broker: %s", reason)

    def _published(self, _c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with self._lock:
            message_id = self._inflight.pop(mid, None)
            if message_id is None:
                # publish() has not returned its packet id to pump() yet
                self._early[mid] = bool(reason.is_failure)
                return
        self._guarded(lambda: self._settle(message_id, bool(reason.is_failure)))
        self._guarded(self.pump)

    def _guarded(self, step: Callable[[], None]) -> None:
        """paho ends its network thread on an exception in a callback: log it instead (a full disk under the
        queue must not leave a session that looks connected and does nothing)."""
        try:
            step()
        except Exception as e:
            self.state.last_error = f"{type(e).__name__} in the message queue"
            _log.exception("the session's message queue failed")

    def _message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        self.state.received += 1
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a bad command must not stop the session
            _log.exception("handling a message on %s failed", message.topic)

"""The hub's data connection to the broker: one MQTT v5 session with the ``hub-client`` certificate, which reads every
device topic the hub ingests and publishes the hub's messages to devices.

- **One per hub.** Mosquitto takes the client id from the certificate (``use_username_as_clientid``): a second
  connection with the same certificate takes the first one's session over. ``warden serve`` runs the link in the
  process that supervises the broker, and only there.
- **TLS as everywhere:** the hub's CA is the only trust anchor, the broker must present ``broker.<fleet-domain>``
  (checked by the TLS layer), TLS 1.2 or newer. The TCP connection goes to the configured address
  (:meth:`_Client._create_socket_connection`) while the name checked is the broker's: paho hands its ``host`` to
  ``wrap_socket`` as ``server_hostname``, so ``host`` is the name and the address travels separately.
- **Sessions:** clean start off with a session expiry, so the broker queues messages while the hub restarts; the
  subscriptions (``warden/+/telemetry|health|events``, QoS 1) are made again on every CONNACK anyway, since a session
  the broker lost keeps none. Receive Maximum is raised to 2,000 (:attr:`LinkOptions.receive_maximum` says why not
  more).
- **Reconnects** after any loss with capped exponential backoff; the backoff only starts again from its minimum
  after a session that lasted, and a session another connection with the hub's certificate took over means the
  longest backoff (rather than a fight over the session, which would cut both off all the time).
- **The network thread** is the link's own (an epoll loop, not ``select()``, so the socket may have any file
  descriptor number). It hands each PUBLISH's topic and payload to ``deliver`` in that thread, reads the socket
  until it would block, acknowledges every QoS 1 message after ``deliver`` returned (the PUBACKs of one turn go out
  in one write), waits ``linger`` after a busy turn, and calls ``on_tick`` every ``tick_seconds``.
  :meth:`HubLink.publish` is safe from any thread.

A message is acknowledged once the ingest has taken it into memory, not once it is in the database: after a crash
of the hub the aggregates of at most one flush interval are lost (the messages themselves never were stored).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from warden.broker._messages import MAX_MESSAGE_BYTES
from warden.broker._topics import DEVICE_PUBLISHES, DEVICE_RECEIVES, TOPIC_ROOT, parse_device_topic
from warden.core import TLS12_CIPHERS, BrokerError, InvalidInputError

if TYPE_CHECKING:
    from paho.mqtt.client import _InPacket

__all__ = ["Delivery", "HubLink", "LinkOptions", "LinkStatus", "client_tls_context"]

log = logging.getLogger(__name__)

_PUBACK = 0x40
_READ_CHUNK = 256 * 1024
#: packets handled per turn of the loop before it looks at ticks, writes and other work again
_BURST = 5000
#: a session must last this long before the reconnect backoff starts again from its minimum
_STABLE_SECONDS = 10.0
#: the DISCONNECT reason code of a session another connection with the same client id took over
_SESSION_TAKEN_OVER = 0x8E
#: messages paho keeps queued for sending (QoS 1 publishes made while the link is down) before it refuses more
_MAX_QUEUED = 10_000


def _idle_packet() -> _InPacket:
    """paho's incoming-packet state between packets."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


def client_tls_context(*, ca_pem: bytes, cert_file: Path, key_file: Path, key_password: bytes | None) -> ssl.SSLContext:
    """The link's TLS client context: the hub's CA chain as the only trust anchors, the hub-client certificate,
    host name checking on, TLS 1.2 or newer with the hub's cipher list."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    context.load_cert_chain(cert_file, key_file, password=key_password)
    return context


@dataclass(frozen=True, slots=True)
class LinkOptions:
    #: where to connect (host, port), and the name the broker's certificate must carry
    address: tuple[str, int]
    server_name: str
    #: the MQTT client id: the hub-client certificate's name (Mosquitto uses that name whatever is sent)
    client_id: str
    #: a fresh TLS context for each connection (so a renewed hub-client certificate is used at the next one)
    tls: Callable[[], ssl.SSLContext]
    #: changes when the TLS material changes (e.g. the certificate file's mtime): the link then reconnects
    tls_version: Callable[[], object] = lambda: None
    subscriptions: tuple[str, ...] = tuple(f"{TOPIC_ROOT}/+/{kind}" for kind in DEVICE_PUBLISHES)
    keepalive: int = 30
    session_expiry: int = 300
    min_backoff: float = 0.25
    max_backoff: float = 10.0
    tick_seconds: float = 1.0
    connect_timeout: float = 5.0
    #: under a stream of messages, how long the loop waits after a turn that handled some before it reads again:
    #: each turn costs a wake-up, a TLS read and a TLS write (the PUBACKs) whatever it handles, so a turn per
    #: message would cost more than the messages themselves. Idle, the loop waits for the socket as usual.
    linger: float = 0.002
    #: QoS 1 messages the broker may send before the hub's PUBACKs (MQTT 5 Receive Maximum). Mosquitto's default
    #: of 20 would bound throughput by round trips; far more makes Mosquitto 2.0 walk a long in-flight list for
    #: every message it writes, so that a hub falling behind slows the broker down for every client (measured: its
    #: CPU per message went from 30 to over 100 us and stayed there). Beyond this the broker queues (cheaply, up to
    #: its max_queued_messages).
    receive_maximum: int = 2000


@dataclass(frozen=True, slots=True)
class LinkStatus:
    connected: bool
    connects: int
    disconnects: int
    last_error: str | None


class Delivery:
    """A message :meth:`HubLink.publish` queued: :meth:`wait` until the broker acknowledged it (QoS 1)."""

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self._info = info
        self.mid = info.mid

    def wait(self, timeout: float) -> bool:
        try:
            self._info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return self._info.is_published()


class _Client(mqtt.Client):
    """paho's client, with the transport the link needs (see the module docstring). Overrides private methods of
    paho-mqtt 2.1 (pinned): ``_create_socket_connection``, ``_ssl_wrap_socket``, ``_sock_close`` and
    ``_packet_read`` (whole packets from a buffer that is filled by reading the socket until it would block;
    PUBLISH of QoS 0 and 1 handled here, every other packet by paho's handlers)."""

    def __init__(self, options: LinkOptions, deliver: Callable[[bytes, bytes], None]) -> None:
        super().__init__(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        self._address = options.address
        self._deliver = deliver
        self._rbuf = b""
        self._rpos = 0
        self._eof = False
        self._acks = bytearray()
        self.delivery_errors = 0

    # -- transport ----------------------------------------------------------------------------------------------

    def use_tls(self, context: ssl.SSLContext) -> None:
        """Use ``context`` from the next connection on (paho's ``tls_set_context`` may be called once only)."""
        self._ssl_context = None
        self.tls_set_context(context)

    def _create_socket_connection(self) -> socket.socket:
        # To the configured address; paho's own would connect to ``host``, which is the name to verify.
        sock = socket.create_connection(self._address, timeout=self._connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        # As paho's (server_hostname is the broker's name; the context checks it), with the handshake bounded by the
        # connect timeout and the socket closed when the handshake fails.
        assert self._ssl_context is not None
        ssl_sock = self._ssl_context.wrap_socket(tcp_sock, server_hostname=self._host, do_handshake_on_connect=False)
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock

    def _fill(self) -> bytes:
        """Everything the socket holds now, up to :data:`_READ_CHUNK` bytes: each TLS record (one per message, as
        the broker writes them) is one read, and the loop must not go back to epoll for each. BlockingIOError when
        there is nothing; b"" at the end of the stream."""
        if self._eof:
            return b""
        chunks: list[bytes] = []
        size = 0
        while size < _READ_CHUNK:
            try:
                data = super()._sock_recv(_READ_CHUNK)
            except BlockingIOError:
                if chunks:
                    break
                raise
            if not data:
                if not chunks:
                    return b""
                self._eof = True  # the end comes after what was read
                break
            chunks.append(data)
            size += len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def buffered(self) -> bool:
        """Whether bytes already read from the socket wait to be handled (epoll cannot tell)."""
        if self._rpos < len(self._rbuf):
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _sock_close(self) -> None:
        self._rbuf, self._rpos, self._eof = b"", 0, False
        self._acks.clear()
        super()._sock_close()

    # -- incoming packets ---------------------------------------------------------------------------------------

    def read_packets(self, limit: int) -> int:
        """Handle the complete packets the socket holds, up to ``limit``: how many (-1 when the connection is gone;
        paho has been told, as its own loop tells it)."""
        handled = 0
        while handled < limit:
            rc = self._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._loop_rc_handle(rc)
                return -1
            if self._sock is None:
                return -1  # a DISCONNECT from the broker: paho closed the socket and told on_disconnect
            handled += 1
        return handled

    def _packet_read(self) -> MQTTErrorCode:
        # One whole packet from the buffer (refilled from the socket when it holds less than a packet); paho's own
        # reads a byte at a time through _sock_recv and rebuilds its state dictionary for every packet.
        while True:
            buf, pos = self._rbuf, self._rpos
            size = len(buf)
            if size - pos >= 2:
                length = shift = 0
                i = pos + 1
                while i < size:
                    byte = buf[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL  # more than four length bytes
                else:
                    length = -1  # the length is not complete yet
                if length >= 0 and i + length <= size:
                    self._rpos = i + length
                    self._last_msg_in = time.monotonic()
                    command = buf[pos]
                    if command & 0xF4 == 0x30:  # PUBLISH of QoS 0 or 1
                        return self._publish(command, buf, i, i + length)
                    self._in_packet = {
                        "command": command,
                        "have_remaining": 1,
                        "remaining_count": [],
                        "remaining_mult": 1,
                        "remaining_length": length,
                        "packet": bytearray(buf[i : i + length]),
                        "to_process": 0,
                        "pos": 0,
                    }
                    rc = self._packet_handle()
                    self._in_packet = _idle_packet()
                    return rc
            try:
                more = self._fill()
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as e:
                log.debug("hub link: reading failed: %s", e)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if not more:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            self._rbuf, self._rpos = (buf[pos:] + more if pos < size else more), 0

    def _publish(self, command: int, buf: bytes, start: int, end: int) -> MQTTErrorCode:
        """A PUBLISH of QoS 0 or 1 (``buf[start:end]`` after the fixed header): its topic and payload go to the
        ingest, its PUBACK to the batch of acknowledgements."""
        if end - start < 2:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        at = start + 2 + ((buf[start] << 8) | buf[start + 1])
        topic = buf[start + 2 : at]
        mid = 0
        if command & 0x02:
            if at + 2 > end:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            mid = (buf[at] << 8) | buf[at + 1]
            at += 2
        # The properties (the hub uses none of them): a variable byte integer length, then that many bytes.
        length = shift = 0
        while True:
            if at >= end or shift > 21:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            byte = buf[at]
            at += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        at += length
        if at > end:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        try:
            self._deliver(topic, buf[at:end])
        except Exception:
            # The ingest never raises for what a device sends; should it fail anyway, one message is lost, not
            # the connection (and the message is still acknowledged: a redelivery would fail the same way).
            self.delivery_errors += 1
            if self.delivery_errors == 1 or self.delivery_errors % 10_000 == 0:
                log.exception("the ingest failed on a message (%d so far)", self.delivery_errors)
        if command & 0x02:
            self._acks += struct.pack("!BBH", _PUBACK, 2, mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def queue_acks(self) -> None:
        """Queue the PUBACKs collected since the last call as one write."""
        if self._acks:
            acks, self._acks = bytes(self._acks), bytearray()
            self._packet_queue(_PUBACK, acks, 0, 0)


class HubLink:
    """The hub's MQTT data connection (see the module docstring). ``deliver(topic, payload)`` and ``on_tick()`` run
    in the link's thread."""

    def __init__(
        self,
        options: LinkOptions,
        *,
        deliver: Callable[[bytes, bytes], None],
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self._on_tick = on_tick
        self._client = _Client(options, deliver)
        client = self._client
        client.connect_timeout = options.connect_timeout
        client.max_queued_messages_set(_MAX_QUEUED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        # Set, so that paho never writes from the caller's thread: the link's thread writes (see publish).
        client.on_socket_register_write = self._wake_for_write
        client.on_socket_unregister_write = lambda *_: None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Closing the pipe and writing to it exclude each other: a closed descriptor's number may be reused at once.
        self._pipe_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None
        self._connected = threading.Event()
        self._connects = 0
        self._disconnects = 0
        self._last_error: str | None = None
        self._failures = 0
        self._tls_version: object = None
        self._next_tick = 0.0
        self._session_started = 0.0
        self._taken_over = False

    # -- public -----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the hub link runs already")
        self._thread = threading.Thread(target=self._run, name="warden-hub-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect (the broker keeps the session for ``session_expiry`` seconds) and end the thread; the last
        tick runs in it before it ends."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the hub link's thread did not end within %.0f s", timeout)
                return  # its wake-up pipe stays open: the thread may still use it
            self._thread = None
        with self._pipe_lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def status(self) -> LinkStatus:
        return LinkStatus(self.connected, self._connects, self._disconnects, self._last_error)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Delivery:
        """Queue a message to a device (its ``commands`` or ``updates`` topic); thread-safe. While the link is down
        QoS 1 messages wait for the next connection (up to a bound, then :class:`BrokerError`)."""
        parsed = parse_device_topic(topic)
        if parsed is None or parsed[1] not in DEVICE_RECEIVES:
            raise InvalidInputError(
                f"the hub publishes only on devices' commands and updates topics, not {topic[:100]!r}"
            )
        if len(payload) > MAX_MESSAGE_BYTES:
            raise InvalidInputError(f"a message to a device has at most {MAX_MESSAGE_BYTES} bytes")
        if qos not in (0, 1):
            raise InvalidInputError("the hub publishes with QoS 0 or 1")
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(f"the message to {topic} was not queued: {mqtt.error_string(info.rc)}")
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0:
            raise BrokerError("the hub's broker connection is down: a QoS 0 message would be lost")
        return Delivery(info)

    # -- callbacks (the link's thread) ------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._last_error = f"the broker refused the hub's connection: {reason}"
            log.warning("%s", self._last_error)
            return
        self._connects += 1
        self._failures = 0
        self._session_started = time.monotonic()
        options = [(topic, SubscribeOptions(qos=1)) for topic in self.options.subscriptions]
        client.subscribe(options)
        self._connected.set()
        log.info(
            "hub link connected to %s:%d (%s)",
            *self.options.address,
            "session resumed" if flags.session_present else "new session",
        )

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            # The broker's ACL file grants the hub's certificate these topics: a refusal means it was changed.
            self._last_error = f"the broker refused the hub's subscriptions: {', '.join(refused)}"
            log.error("%s; the hub ingests nothing until it is repaired ('warden broker reconcile')", self._last_error)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected.is_set():
            self._disconnects += 1
        self._connected.clear()
        if self._stopping.is_set():
            return
        self._last_error = f"disconnected: {reason}"
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            # Another client holds the hub's certificate (and so its client id): fighting over the session would cut
            # both off all the time. Said loudly; the link tries again at the longest backoff.
            self._taken_over = True
            log.warning(
                "another client connected with the hub-client certificate and took the hub's session over; "
                "the hub link tries again in %.0f s",
                self.options.max_backoff,
            )
        else:
            log.warning("hub link lost its connection to the broker (%s); reconnecting", reason)

    def _wake_for_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self._loop_thread:
            self._wake()

    def _wake(self) -> None:
        with self._pipe_lock:
            if self._wake_w < 0:
                return  # stopped
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(self._wake_w, b"\0")

    # -- the thread -------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._loop_thread = threading.get_ident()
        options = self.options
        self._next_tick = time.monotonic() + options.tick_seconds
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = options.session_expiry
        connect.ReceiveMaximum = options.receive_maximum
        backoff = options.min_backoff
        try:
            while not self._stopping.is_set():
                if self._connect_once(connect):
                    self._serve()
                if self._stopping.is_set():
                    break
                lasted = time.monotonic() - self._session_started if self._session_started else 0.0
                backoff = options.min_backoff if lasted >= _STABLE_SECONDS else min(backoff * 2, options.max_backoff)
                if self._taken_over:
                    backoff, self._taken_over = options.max_backoff, False
                self._session_started = 0.0
                self._pause(backoff)
        finally:
            self._shutdown()

    def _connect_once(self, properties: Properties) -> bool:
        client = self._client
        options = self.options
        try:
            self._tls_version = options.tls_version()
            client.use_tls(options.tls())
            client.connect_async(
                options.server_name,
                options.address[1],
                keepalive=options.keepalive,
                clean_start=False,
                properties=properties,
            )
            client.reconnect()
            return True
        except (OSError, ssl.SSLError, ValueError) as e:
            # A broker that is restarting, or not there yet: said once at WARNING, then quietly until it works.
            self._failures += 1
            self._last_error = f"cannot connect to the broker at {options.address[0]}:{options.address[1]}: {e}"
            (log.warning if self._failures == 1 else log.debug)("%s", self._last_error)
            with contextlib.suppress(Exception):
                client._sock_close()
            return False

    def _serve(self) -> None:
        client = self._client
        sock = client.socket()
        if sock is None:
            return
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        selector.register(sock, selectors.EVENT_READ)
        writing = False
        handled = 0
        linger = self.options.linger
        try:
            while not self._stopping.is_set():
                if handled and linger and not client.buffered():
                    time.sleep(linger)  # under load: let messages gather (see LinkOptions.linger)
                timeout = 0.0 if client.buffered() else max(0.0, min(1.0, self._next_tick - time.monotonic()))
                events = selector.select(timeout)
                readable = client.buffered()
                for key, _ in events:
                    if key.fd == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                    else:
                        readable = True
                handled = self._read_burst() if readable else 0
                if handled < 0:
                    return
                client.queue_acks()
                if client.want_write() and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return
                if client.socket() is None or client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return
                if client.want_write() != writing:
                    writing = client.want_write()
                    mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
                    selector.modify(sock, mask)
                if self._tick_if_due() and self._tls_version != self.options.tls_version():
                    log.info("the hub-client certificate changed: reconnecting with the new one")
                    self._session_started = time.monotonic() - _STABLE_SECONDS  # at once, without backoff growth
                    client.disconnect()
                    client.loop_write()
                    return
        finally:
            selector.close()
            if self._stopping.is_set() and client.socket() is not None:
                with contextlib.suppress(Exception):
                    client.disconnect()
                    client.loop_write()
            with contextlib.suppress(Exception):
                client._sock_close()
            self._connected.clear()

    def _read_burst(self) -> int:
        """Handle what the socket holds, up to :data:`_BURST` packets: how many (-1 when the connection is gone)."""
        return self._client.read_packets(_BURST)

    def _tick_if_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_tick:
            return False
        self._next_tick = max(self._next_tick + self.options.tick_seconds, now)
        self._tick()
        return True

    def _tick(self) -> None:
        if self._on_tick is None:
            return
        try:
            self._on_tick()
        except Exception:
            log.exception("the hub link's tick failed")

    def _pause(self, seconds: float) -> None:
        """Wait before the next connection attempt, still ticking (pending batches are flushed meanwhile)."""
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            self._stopping.wait(min(deadline, self._next_tick) - now)
            self._tick_if_due()

    def _shutdown(self) -> None:
        self._connected.clear()
        self._tick()  # the last batch

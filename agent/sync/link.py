"""The agent's one MQTT connection: `MqttLink` (paho-mqtt 2, MQTT 5, asyncio).

Topics are built by `agent.sync.topics.Topics` (the layout is documented there). On
every successful connect the link publishes a retained *birth* on
``{prefix}/{site}/{room}/state``::

    {"status": "online", "device": "school1.room1", "site": "school1", "room": "room1",
     "version": "0.1.0", "profile": "nuc-c920", "boot_time": "...Z",
     "connected_at": "...Z", "seq": 3}

and registers, before that connect, a retained Last Will with the same ``seq`` and
``"status": "offline", "reason": "connection lost"``. ``seq`` grows by one per
connection attempt (Sparkplug's ``bdSeq``): a will that reaches a dashboard late, after
the device is back with a higher ``seq``, can be recognised as stale. A clean stop
publishes ``"status": "offline", "reason": "shutdown"`` and sends DISCONNECT, which
discards the will.

How paho and asyncio meet
-------------------------
paho's own network thread (``loop_start``) would run every callback on a foreign
thread and reconnect on its own schedule; we would need locks around our state and a
second reconnect policy to fight with. Instead the link drives paho from the event
loop, as aiomqtt does: the socket is registered with ``loop.add_reader`` /
``add_writer`` through paho's ``on_socket_*`` callbacks, ``loop_read`` /
``loop_write`` run when the socket is ready and ``loop_misc`` (keepalive) on a one
second timer. Every paho callback therefore runs on the event loop thread, and the
reconnect policy (capped exponential backoff with full jitter) is ours alone. The
one blocking call, ``Client.connect()`` (DNS, TCP connect, TLS handshake, up to
``connect_timeout``), runs on a short-lived daemon thread; the event loop does not
touch that client until the thread hands it back, and an attempt abandoned by
cancellation is closed by the thread's hand-back. TLS needs one extra step: bytes
already decrypted into the ``SSLSocket``'s buffer do not wake the selector, so the
reader drains ``pending()`` after each read.

Each connection attempt gets a fresh paho ``Client`` (clean start, no session): the
will must carry the new ``seq``, and unacknowledged QoS 1 publishes of a dead
connection are failed with `LinkDown` rather than silently re-sent later; queuing
across outages belongs to the store-and-forward layer above.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.backoff import backoff_delay
from agent.config.models import BROKER_URL_PATTERN, BrokerConfig, IdentityConfig
from agent.sync.topics import Topics

logger = logging.getLogger(__name__)

Payload = bytes | bytearray | str | Mapping[str, Any]

CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake, in the connect thread
GOODBYE_TIMEOUT_S = 0.5  # wait this long for the PUBACK of the "shutdown" state
STABLE_AFTER_S = 10.0  # a connection this old resets the backoff to its first step
FAST_RETRY_S = 60.0  # after losing a stable connection, retry often for this long...
FAST_RETRY_MAX_S = 3.0  # ...at most this far apart (lessons resume within seconds)
TLS_CLOSE_LIMIT = 2  # bare TLS closes before CONNACK (before any success) meaning "rejected"
DEFAULT_QUEUE_SIZE = 256
_SOCKET_ERROR_PREFIX = "failed to receive on socket: "  # paho's log text for send/recv errors
_AUTH_REASONS = {
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
}


# -- errors -----------------------------------------------------------------------------


class LinkError(Exception):
    """Base class of the link's errors."""


class LinkDown(LinkError):
    """Not connected: a QoS > 0 publish could not be sent or acknowledged."""


class LinkConfigError(LinkError):
    """Configuration the link cannot work with (fatal; the CLI exits with code 2)."""


class LinkAuthError(LinkConfigError):
    """The broker refused this device's credentials before the link ever connected."""


class PublishRejected(LinkError):
    """The broker answered a QoS > 0 publish with a failure reason code (MQTT 5)."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        super().__init__(f"broker rejected publish to {topic!r}: {reason} (0x{reason_code:02X})")
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason


class SubscribeRejected(LinkError):
    """The broker refused a subscription (SUBACK failure reason code)."""


# -- small value types ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    retain: bool
    qos: int

    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ``ValueError`` if it is not JSON)."""
        return json.loads(self.payload)


@dataclass(frozen=True)
class LinkStats:
    """A snapshot of the link's counters (for health telemetry)."""

    url: str
    connected: bool
    connected_since: str | None
    seq: int
    connect_attempts: int
    connects: int
    disconnects: int
    last_error: str | None
    published: int
    received: int
    dropped_publishes: int  # QoS 0 publishes dropped while disconnected
    dropped_messages: int  # received messages dropped by full subscription queues
    publish_rtt_ms: float | None  # last QoS 1 publish → PUBACK
    ping_rtt_ms: float | None  # last PINGREQ → PINGRESP

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_payload(payload: Payload) -> tuple[bytes, bool]:
    """``(bytes, is_json)``: dicts become compact UTF-8 JSON, str UTF-8."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload), False
    if isinstance(payload, str):
        return payload.encode("utf-8"), False
    if isinstance(payload, Mapping):
        try:
            text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc
        return text.encode("utf-8"), True
    raise TypeError(f"payload must be bytes, str or a dict, not {type(payload).__name__}")


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _json_properties(packet_type: int) -> Properties:
    props = _properties(packet_type)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    return props


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _validate_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise ValueError("topic filter must not be empty")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(
                f"invalid topic filter {topic_filter!r}: '#' must be a whole last level"
            )
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {topic_filter!r}: '+' must be a whole level")


def _reason_text(reason: ReasonCode | int) -> str:
    if isinstance(reason, ReasonCode):
        return str(reason)
    return mqtt.error_string(reason)


# -- subscriptions ----------------------------------------------------------------------


class Subscription:
    """Messages matching one topic filter; use as ``async with`` + ``async for``.

    ::

        async with link.subscribe("edu/lesson/+") as messages:
            async for message in messages:
                ...

    Entering subscribes (and, when connected, waits for the SUBACK); the subscription
    survives reconnects (the link subscribes again after each); leaving unsubscribes
    when no other `Subscription` of the link uses the same filter. The queue is
    bounded: when the consumer falls behind the oldest message is dropped and counted
    in ``dropped``. After a reconnect the broker sends retained messages again
    (``Message.retain`` is set on them).
    """

    def __init__(self, link: MqttLink, topic_filter: str, qos: int, maxsize: int) -> None:
        _validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.topic_filter = topic_filter
        self.qos = qos
        self.dropped = 0
        self._link = link
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize)
        self._active = False

    async def __aenter__(self) -> Self:
        await self._link._add_subscription(self)
        self._active = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        self._link._remove_subscription(self)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    async def get(self) -> Message:
        """The next message (waits for one)."""
        if not self._active:
            raise RuntimeError("use 'async with link.subscribe(...)' before reading messages")
        return await self._queue.get()

    def _deliver(self, message: Message) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            self._link._dropped_messages += 1
        self._queue.put_nowait(message)


@dataclass
class _Filter:
    topic_filter: str
    sub_id: int
    qos: int
    subscribers: list[Subscription]


# -- one connection ---------------------------------------------------------------------


@dataclass
class _Pending:
    future: asyncio.Future[None]
    started: float
    topic: str


@dataclass(frozen=True)
class _Credentials:
    username: str | None
    password: str | None
    ssl_context: ssl.SSLContext | None


@dataclass(frozen=True)
class _Outcome:
    kind: str  # lost | unreachable | tls | tls_closed | refused | closed
    detail: str
    uptime_s: float = 0.0


class _Connection:
    """One paho client and its socket, driven by the event loop (see module doc)."""

    def __init__(
        self, link: MqttLink, client: mqtt.Client, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.link = link
        self.client = client
        self.loop = loop
        self.connack: asyncio.Future[tuple[ReasonCode, Properties | None]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.established = False
        self.disconnect_reason: str | None = None
        self.socket_error: str | None = None
        self.pending: dict[int, _Pending] = {}
        self.pending_subs: dict[int, asyncio.Future[None]] = {}
        self.sub_ids_supported = True
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ping_sent: float | None = None
        self._loop_thread = threading.get_ident()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_log = self._on_log

    # Called on the event loop once the connect thread has handed the client back.
    def attach(self) -> None:
        sock = self.client.socket()
        if sock is None:
            self._resolve_closed()
            return
        self._fd = sock.fileno()
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.loop.add_reader(self._fd, self._on_readable)
        self.flush()
        self._timer = self.loop.call_later(1.0, self._on_timer)

    def detach(self, why: str) -> None:
        """Forget the socket and fail everything still waiting on this connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unregister()
        sock = self.client.socket()
        if sock is not None:
            # Not closed by paho (CONNACK timeout, goodbye failed): closing without
            # DISCONNECT lets the broker publish the will, which is the truth here.
            self.client.on_socket_close = None
            with contextlib.suppress(OSError):
                sock.close()
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    LinkDown(f"{why}; publish to {pending.topic!r} not acknowledged")
                )
        self.pending.clear()
        for future in self.pending_subs.values():
            if not future.done():
                future.set_exception(LinkDown(why))
        self.pending_subs.clear()
        self._resolve_closed()

    def _unregister(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = None

    def _resolve_closed(self) -> None:
        if self.established:
            # Close the gate now, not when run() gets to it: publishes in between
            # must count as dropped / raise LinkDown rather than vanish.
            self.link._connected.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def flush(self) -> None:
        """Write what paho has queued now (also registers the writer if it blocks)."""
        if self.client.socket() is None:
            return
        try:
            self.client.loop_write()
        except Exception:
            logger.exception("unexpected error writing to the broker")
            self.abort()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will)."""
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]

    # -- event loop callbacks -------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            for _ in range(256):
                rc = self.client.loop_read()
                sock = self.client.socket()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
                    return
                if not isinstance(sock, ssl.SSLSocket) or sock.pending() == 0:
                    return
            self.loop.call_soon(self._on_readable)  # more decrypted data; let others run
        except Exception:
            logger.exception("unexpected error reading from the broker")
            self.abort()

    def _on_writable(self) -> None:
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        if self.client.socket() is None:
            return
        try:
            self.client.loop_misc()  # keepalive: PINGREQ, and the PINGRESP deadline
        except Exception:
            logger.exception("unexpected error in MQTT keepalive")
            self.abort()
        if self.client.socket() is not None:
            self._timer = self.loop.call_later(1.0, self._on_timer)

    # -- paho socket callbacks (event loop thread) -----------------------------------

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._unregister()
        self._resolve_closed()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self.loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self.loop.remove_writer(self._fd)

    # -- paho MQTT callbacks (event loop thread) -------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if (
            properties is not None
            and getattr(properties, "SubscriptionIdentifierAvailable", 1) == 0
        ):
            self.sub_ids_supported = False
        if not self.connack.done():
            self.connack.set_result((reason, properties))

    def _on_disconnect(  # may run on the connect thread: then it only records
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if getattr(flags, "is_disconnect_packet_from_server", False):
            self.disconnect_reason = f"broker sent DISCONNECT: {reason}"
        elif self.socket_error:
            self.disconnect_reason = self.socket_error
        else:
            self.disconnect_reason = "connection closed by the broker"
        if threading.get_ident() == self._loop_thread:  # not on the connect thread
            self._resolve_closed()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.link._route(msg)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        pending = self.pending.pop(mid, None)
        if pending is None:
            return  # QoS 0 (written to the socket) or a publish nobody waits for
        self.link._publish_rtt_ms = (time.monotonic() - pending.started) * 1000.0
        if pending.future.done():
            return
        if reason.is_failure:
            pending.future.set_exception(PublishRejected(pending.topic, reason.value, str(reason)))
        else:
            pending.future.set_result(None)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        future = self.pending_subs.pop(mid, None)
        failures = [str(reason) for reason in reasons if reason.is_failure]
        if future is None or future.done():
            return
        if failures:
            future.set_exception(SubscribeRejected(", ".join(failures)))
        else:
            future.set_result(None)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # May run on the connect thread: only plain attribute writes and logging here.
        if level == mqtt.MQTT_LOG_ERR and text.startswith(_SOCKET_ERROR_PREFIX):
            self.socket_error = text.removeprefix(_SOCKET_ERROR_PREFIX)
        if text.startswith("Sending PINGREQ"):
            self._ping_sent = time.monotonic()
        elif text.startswith("Received PINGRESP") and self._ping_sent is not None:
            self.link._ping_rtt_ms = (time.monotonic() - self._ping_sent) * 1000.0
            self._ping_sent = None
        logger.debug("paho: %s", text)

    # -- requests ---------------------------------------------------------------------

    def start_publish(
        self, topic: str, data: bytes, qos: int, retain: bool, is_json: bool
    ) -> asyncio.Future[None] | None:
        """Queue a publish; for QoS > 0 return the future of its acknowledgement."""
        props = _json_properties(PacketTypes.PUBLISH) if is_json else None
        info = self.client.publish(topic, data, qos=qos, retain=retain, properties=props)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise LinkDown(
                f"connection to {self.link.url} is closing; publish to {topic!r} not sent"
            )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        self.link._published += 1
        if qos == 0:
            return None
        future: asyncio.Future[None] = self.loop.create_future()
        self.pending[info.mid] = _Pending(future, time.monotonic(), topic)
        return future

    def start_subscribe(self, entry: _Filter) -> asyncio.Future[None]:
        props: Properties | None = None
        if self.sub_ids_supported:
            props = _properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = entry.sub_id
        rc, mid = self.client.subscribe(
            entry.topic_filter, options=SubscribeOptions(qos=entry.qos), properties=props
        )
        future: asyncio.Future[None] = self.loop.create_future()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            future.set_exception(
                LinkDown(f"subscribe to {entry.topic_filter!r}: {mqtt.error_string(rc)}")
            )
        else:
            self.pending_subs[mid] = future
        return future

    def start_unsubscribe(self, topic_filter: str) -> None:
        self.client.unsubscribe(topic_filter)


# -- the link ---------------------------------------------------------------------------


def _consume(future: asyncio.Future[None], what: str) -> None:
    """Done-callback for futures nobody awaits: log failures instead of losing them."""
    if future.cancelled():
        return
    exc = future.exception()
    if isinstance(exc, LinkDown):
        logger.debug("%s: %s", what, exc)
    elif exc is not None:
        logger.error("%s: %s", what, exc)


class MqttLink:
    """The agent's MQTT connection; a supervisor service (``name``, ``run()``).

    ``run()`` connects, keeps the link up and reconnects (capped exponential backoff,
    full jitter) until cancelled; on cancellation it publishes the retained
    ``offline``/``shutdown`` state, disconnects and re-raises within a second.
    Before the first successful connection, a refusal of the credentials raises
    `LinkAuthError` and a TLS failure `LinkConfigError` out of ``run()``; afterwards
    every failure is logged and retried (the broker may be restarting).

    Identity: client id = ``identity.device_id``; user name = ``broker.username``,
    or the device id when a password is configured; with neither, the link connects
    anonymously. ``broker.password_file`` and the TLS files are read at start and again
    before each attempt (rotated credentials apply without a restart; if a later read
    fails the last good value is kept).
    """

    name = "mqtt"

    def __init__(
        self,
        broker: BrokerConfig,
        identity: IdentityConfig,
        *,
        software_version: str,
        profile_name: str,
        url_override: str | None = None,
        boot_time: dt.datetime | None = None,
        rng: random.Random | None = None,
        announce: bool = True,
    ) -> None:
        self.broker = broker
        # Observers (the demo's monitor, dashboards) read the fleet without appearing
        # in it: no birth, no Last Will, no shutdown state.
        self.announce = announce
        self.identity = identity
        self.software_version = software_version
        self.profile_name = profile_name
        try:
            self.topics = Topics(broker.topic_prefix, identity.site, identity.room)
        except ValueError as exc:
            raise LinkConfigError(f"identity: {exc}") from exc
        url = url_override or broker.url
        if not url:
            raise LinkConfigError(
                "broker.url is empty and no embedded broker URL was given: set broker.url "
                "to mqtt://host:1883 or mqtts://host:8883"
            )
        match = BROKER_URL_PATTERN.match(url)
        if not match:
            raise LinkConfigError(f"broker.url: must look like mqtt://host:1883, got {url!r}")
        self.url = url
        self._tls = match.group(1) == "mqtts"
        self._host = match.group(2).strip("[]")
        self._port = int(match.group(4)) if match.group(4) else (8883 if self._tls else 1883)
        if self._tls and broker.tls is None:
            raise LinkConfigError(f"broker.tls: {url} is mqtts:// but there is no 'tls' section")
        self.boot_time = (boot_time or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        self._rng = rng or random.Random()

        self._running = False
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._credentials: _Credentials | None = None
        self._filters: dict[str, _Filter] = {}
        self._by_sub_id: dict[int, _Filter] = {}
        self._next_sub_id = 1

        self._seq = 0
        self._ever_connected = False
        self._connected_since: str | None = None
        self._attempts = 0
        self._connects = 0
        self._disconnects = 0
        self._last_error: str | None = None
        self._published = 0
        self._received = 0
        self._dropped_publishes = 0
        self._dropped_messages = 0
        self._publish_rtt_ms: float | None = None
        self._ping_rtt_ms: float | None = None
        self._outage_since: float | None = None
        self._outage_kind: str | None = None
        self._outage_attempts = 0
        self._tls_closes = 0

    # -- public API -------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def seq(self) -> int:
        """Birth sequence number of the current (or last) connection."""
        return self._seq

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the link is connected (birth sent); ``TimeoutError`` after ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def publish(
        self, topic: str, payload: Payload, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Publish ``payload`` (bytes, str, or a dict sent as compact JSON).

        QoS 0: fire and forget; dropped (and counted) while disconnected. QoS 1/2:
        returns once the broker acknowledged; raises `LinkDown` when disconnected or
        when the connection dies first (the message may or may not have arrived), and
        `PublishRejected` when the broker refuses it (e.g. 0x87 "Not authorized" from
        the ACL).
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        data, is_json = encode_payload(payload)
        conn = self._conn
        if conn is None or not self._connected.is_set():
            if qos == 0:
                self._dropped_publishes += 1
                return
            raise LinkDown(f"not connected to {self.url}; QoS {qos} publish to {topic!r} not sent")
        try:
            future = conn.start_publish(topic, data, qos, retain, is_json)
        except LinkDown:
            if qos == 0:
                self._dropped_publishes += 1
                return
            raise
        if future is not None:
            await future

    def subscribe(
        self, topic_filter: str, qos: int = 1, *, maxsize: int = DEFAULT_QUEUE_SIZE
    ) -> Subscription:
        """A `Subscription` to ``topic_filter``: ``async with`` it, then ``async for``."""
        return Subscription(self, topic_filter, qos, maxsize)

    def stats(self) -> LinkStats:
        return LinkStats(
            url=self.url,
            connected=self.is_connected,
            connected_since=self._connected_since if self.is_connected else None,
            seq=self._seq,
            connect_attempts=self._attempts,
            connects=self._connects,
            disconnects=self._disconnects,
            last_error=self._last_error,
            published=self._published,
            received=self._received,
            dropped_publishes=self._dropped_publishes,
            dropped_messages=self._dropped_messages,
            publish_rtt_ms=self._publish_rtt_ms,
            ping_rtt_ms=self._ping_rtt_ms,
        )

    async def run(self) -> None:
        """Connect and stay connected until cancelled (see the class docstring)."""
        if self._running:
            raise RuntimeError("MqttLink.run() is already running")
        self._running = True
        try:
            self._credentials = await asyncio.to_thread(self._load_credentials, None)
            attempt = 0
            outage_since: float | None = None
            while True:
                outcome = await self._connect_and_serve()
                self._after_attempt(outcome)
                if outcome.kind == "lost" and outcome.uptime_s >= STABLE_AFTER_S:
                    attempt = 0
                    outage_since = time.monotonic()
                # A room that just lost a good connection (a network blip, a broker
                # restart) retries often for a minute, so a lesson resumes within seconds
                # of the network coming back; a long outage backs off to reconnect_max_s.
                cap = self.broker.reconnect_max_s
                if outage_since is not None and time.monotonic() - outage_since < FAST_RETRY_S:
                    cap = min(cap, max(FAST_RETRY_MAX_S, self.broker.reconnect_min_s))
                delay = backoff_delay(attempt, self.broker.reconnect_min_s, cap, self._rng)
                attempt += 1
                logger.debug("reconnecting to %s in %.2f s (attempt %d)", self.url, delay, attempt)
                await asyncio.sleep(delay)
                try:
                    self._credentials = await asyncio.to_thread(
                        self._load_credentials, self._credentials
                    )
                except LinkConfigError as exc:
                    logger.warning("%s; keeping the credentials read earlier", exc)
        finally:
            self._running = False
            self._connected.clear()

    # -- connection attempts ----------------------------------------------------------

    async def _connect_and_serve(self) -> _Outcome:
        self._seq += 1
        self._attempts += 1
        seq = self._seq
        client = self._new_client(seq)
        # Callbacks are installed before connect() so that an error paho meets while
        # sending CONNECT (on the connect thread) is still recorded.
        conn = _Connection(self, client, asyncio.get_running_loop())
        try:
            await _connect_in_thread(client, self._host, self._port, self.broker.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            return _Outcome("tls", f"certificate verify failed: {exc.verify_message or exc}")
        except ssl.SSLError as exc:
            detail = exc.reason or str(exc)
            # An alert during the handshake (TLS 1.2) is the broker refusing us, most
            # likely our client certificate; under TLS 1.3 it comes after CONNECT.
            return _Outcome("tls_closed" if "ALERT" in detail.upper() else "tls", detail)
        except (OSError, ValueError) as exc:
            return _Outcome("unreachable", _describe_os_error(exc))

        self._conn = conn
        why = "connection closed"
        try:
            conn.attach()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    waiting: set[asyncio.Future[Any]] = {conn.connack, conn.closed}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                why = "no CONNACK"
                return _Outcome("closed", f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s")
            if not conn.connack.done():
                detail = conn.disconnect_reason or "connection closed before CONNACK"
                why = detail
                return _Outcome("tls_closed" if self._tls else "closed", detail)
            reason, _props = conn.connack.result()
            if reason.is_failure:
                why = str(reason)
                return _Outcome("refused", str(reason))
            if conn.closed.done():  # accepted, then dropped at once (e.g. taken over)
                why = conn.disconnect_reason or "connection closed after CONNACK"
                return _Outcome("closed", why)

            started = time.monotonic()
            self._established(conn, seq)
            try:
                await conn.closed
            except asyncio.CancelledError:
                await self._goodbye(conn, seq)
                raise
            why = conn.disconnect_reason or "connection lost"
            return _Outcome("lost", why, time.monotonic() - started)
        except asyncio.CancelledError:
            why = "link stopped"
            if not conn.established and conn.client.socket() is not None:
                # CONNECT is out: say DISCONNECT so the broker drops the will.
                conn.client.disconnect()
                conn.flush()
            raise
        finally:
            conn.detach(f"{why} ({self.url})")
            self._conn = None
            if conn.established:
                self._connected.clear()
                self._disconnects += 1

    def _new_client(self, seq: int) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.identity.device_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        creds = self._credentials
        assert creds is not None
        if creds.username is not None:
            client.username_pw_set(creds.username, creds.password)
        if creds.ssl_context is not None:
            client.tls_set_context(creds.ssl_context)
            tls = self.broker.tls
            client.tls_insecure_set(not (tls.check_hostname if tls else True))
        if not self.announce:
            return client
        will, _ = encode_payload(self._state_payload("offline", seq, reason="connection lost"))
        client.will_set(
            self.topics.state,
            will,
            qos=1,
            retain=True,
            properties=_json_properties(PacketTypes.WILLMESSAGE),
        )
        return client

    def _established(self, conn: _Connection, seq: int) -> None:
        """CONNACK success: subscribe again, publish the birth, open the gate.

        Synchronous on purpose: no other coroutine can publish or subscribe between
        the re-subscriptions and the birth, and packets leave in this order, so a
        dashboard that sees "online" knows the device's subscriptions are in place.
        """
        conn.established = True
        self._connects += 1
        self._ever_connected = True
        self._tls_closes = 0
        for entry in self._filters.values():
            conn.start_subscribe(entry).add_done_callback(
                functools.partial(_consume, what=f"subscribe to {entry.topic_filter!r}")
            )
        self._connected_since = _utc_now()
        if self.announce:
            birth = self._state_payload("online", seq, connected_at=self._connected_since)
            data, _ = encode_payload(birth)
            try:
                future = conn.start_publish(self.topics.state, data, 1, True, True)
            except LinkDown:
                return  # closed under us; conn.closed is done and run() moves on
            if future is not None:
                future.add_done_callback(lambda f: _consume(f, "birth message"))
        conn.flush()
        if self._outage_since is not None:
            logger.info(
                "connected to %s again after %.1f s (%d attempts), seq %d",
                self.url,
                time.monotonic() - self._outage_since,
                self._outage_attempts,
                seq,
            )
        else:
            logger.info("connected to %s as %s, seq %d", self.url, self.identity.device_id, seq)
        self._outage_since = None
        self._outage_kind = None
        self._outage_attempts = 0
        self._connected.set()

    async def _goodbye(self, conn: _Connection, seq: int) -> None:
        """Retained offline/shutdown, then DISCONNECT (which discards the will)."""
        self._connected.clear()
        try:
            payload = self._state_payload(
                "offline", seq, reason="shutdown", disconnected_at=_utc_now()
            )
            data, _ = encode_payload(payload)
            future = (
                conn.start_publish(self.topics.state, data, 1, True, True)
                if self.announce
                else None
            )
            conn.flush()
            if future is not None:
                await asyncio.wait({future}, timeout=GOODBYE_TIMEOUT_S)
                if not future.done():
                    logger.warning(
                        "no PUBACK for the shutdown state within %.1f s", GOODBYE_TIMEOUT_S
                    )
                future.add_done_callback(lambda f: _consume(f, "shutdown state"))
            conn.client.disconnect()
            conn.flush()
            logger.info("disconnected from %s (shutdown), seq %d", self.url, seq)
        except LinkError as exc:
            logger.warning("could not say goodbye to %s: %s", self.url, exc)

    def _after_attempt(self, outcome: _Outcome) -> None:
        """Log an attempt's end once per outage, or raise if it is fatal."""
        self._last_error = f"{outcome.kind}: {outcome.detail}"
        if outcome.kind == "lost":
            logger.warning("connection to %s lost (%s); reconnecting", self.url, outcome.detail)
            self._outage_since = time.monotonic()
            self._outage_kind = "lost"
            self._outage_attempts = 0
            return
        self._outage_attempts += 1
        if not self._ever_connected:
            self._raise_if_fatal(outcome)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        message = self._describe_failure(outcome)
        if outcome.kind != self._outage_kind:
            self._outage_kind = outcome.kind
            logger.warning("%s; retrying in the background", message)
        else:
            logger.debug("%s (attempt %d)", message, self._outage_attempts)

    def _raise_if_fatal(self, outcome: _Outcome) -> None:
        if outcome.kind == "refused" and outcome.detail in _AUTH_REASONS:
            creds = self._credentials
            user = creds.username if creds else None
            source = "broker.password_file" if self.broker.password_file else "broker.password"
            if user is None:
                raise LinkAuthError(
                    f"broker {self.url} refused the anonymous connection ({outcome.detail}): "
                    "set broker.username and broker.password_file"
                )
            raise LinkAuthError(
                f"broker {self.url} refused the credentials for user {user!r} "
                f"({outcome.detail}): check broker.username and {source}"
            )
        if outcome.kind == "tls":
            raise LinkConfigError(
                f"TLS handshake with broker {self.url} failed ({outcome.detail}): check "
                "broker.tls.ca_file (the CA that signed the broker's certificate) and "
                "broker.tls.check_hostname"
            )
        if outcome.kind == "tls_closed":
            # A TLS alert (unknown CA, expired, certificate required) is the broker's
            # verdict on our certificate. A bare close is what it looks like too, but
            # also what a broker restarting mid-handshake does: believe it twice.
            self._tls_closes += 1
            alert = "ALERT" in outcome.detail.upper()
            if alert or self._tls_closes >= TLS_CLOSE_LIMIT:
                tls = self.broker.tls
                if tls is not None and tls.cert_file is not None:
                    check = (
                        f"check broker.tls.cert_file ({tls.cert_file}: issued by a CA the broker "
                        "trusts? expired?) and broker.tls.key_file"
                    )
                else:
                    check = (
                        "broker.tls has no cert_file/key_file, and this broker probably requires "
                        "a client certificate"
                    )
                raise LinkConfigError(
                    f"broker {self.url} rejected the TLS connection before answering CONNECT "
                    f"({outcome.detail}): it most likely refuses this device's client "
                    f"certificate; {check}"
                )

    def _describe_failure(self, outcome: _Outcome) -> str:
        if outcome.kind == "unreachable":
            return f"broker {self.url} unreachable ({outcome.detail})"
        if outcome.kind == "refused":
            return f"broker {self.url} refused the connection ({outcome.detail})"
        if outcome.kind == "tls":
            return f"TLS handshake with broker {self.url} failed ({outcome.detail})"
        if outcome.kind == "tls_closed":
            return (
                f"broker {self.url} closed the TLS connection before CONNACK ({outcome.detail}); "
                "a rejected client certificate looks like this"
            )
        return f"broker {self.url} closed the connection before CONNACK ({outcome.detail})"

    # -- payloads ---------------------------------------------------------------------

    def _state_payload(self, status: str, seq: int, **extra: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "status": status,
            "device": self.identity.device_id,
            "site": self.identity.site,
            "room": self.identity.room,
            "version": self.software_version,
            "profile": self.profile_name,
            "boot_time": self.boot_time.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        if self.identity.display_name:
            payload["display_name"] = self.identity.display_name
        payload.update(extra)
        payload["seq"] = seq
        return payload

    # -- subscriptions ----------------------------------------------------------------

    async def _add_subscription(self, sub: Subscription) -> None:
        entry = self._filters.get(sub.topic_filter)
        send = False
        if entry is None:
            entry = _Filter(sub.topic_filter, self._next_sub_id, sub.qos, [])
            self._next_sub_id += 1
            self._filters[sub.topic_filter] = entry
            self._by_sub_id[entry.sub_id] = entry
            send = True
        elif sub.qos > entry.qos:
            entry.qos = sub.qos
            send = True
        entry.subscribers.append(sub)
        conn = self._conn
        if not send or conn is None or not self._connected.is_set():
            return  # subscribed by _established() on the next connect
        try:
            await conn.start_subscribe(entry)
        except LinkDown:
            pass  # the connection dropped meanwhile; the next connect subscribes
        except SubscribeRejected:
            self._remove_subscription(sub)
            raise

    def _remove_subscription(self, sub: Subscription) -> None:
        entry = self._filters.get(sub.topic_filter)
        if entry is None or sub not in entry.subscribers:
            return
        entry.subscribers.remove(sub)
        if entry.subscribers:
            return
        del self._filters[entry.topic_filter]
        del self._by_sub_id[entry.sub_id]
        conn = self._conn
        if conn is not None and self._connected.is_set():
            conn.start_unsubscribe(entry.topic_filter)

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            logger.warning("dropped a message whose topic is not UTF-8")
            return
        self._received += 1
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        if isinstance(ids, int):
            ids = [ids]
        targets: list[_Filter]
        if ids:
            targets = [self._by_sub_id[i] for i in ids if i in self._by_sub_id]
        else:
            targets = [
                e for e in self._filters.values() if mqtt.topic_matches_sub(e.topic_filter, topic)
            ]
        if not targets:
            return
        message = Message(
            topic=topic, payload=bytes(msg.payload), retain=bool(msg.retain), qos=msg.qos
        )
        for entry in targets:
            for sub in list(entry.subscribers):
                sub._deliver(message)

    # -- credentials (worker thread) --------------------------------------------------

    def _load_credentials(self, previous: _Credentials | None) -> _Credentials:
        password: str | None = None
        if self.broker.password is not None:
            password = self.broker.password.get_secret_value()
        elif self.broker.password_file is not None:
            password = _read_password_file(self.broker.password_file)
        username = self.broker.username
        if username is None and password is not None:
            username = self.identity.device_id
        context: ssl.SSLContext | None = None
        if self._tls:
            context = self._ssl_context()
        elif self.broker.tls is not None and previous is None:
            logger.warning("broker.tls is ignored: %s is not an mqtts:// URL", self.url)
        return _Credentials(username, password, context)

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self.broker.tls
        assert tls is not None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            raise LinkConfigError(
                f"broker.tls.ca_file: {tls.ca_file} is not a PEM CA certificate ({exc.reason})"
            ) from exc
        except OSError as exc:
            raise LinkConfigError(
                f"broker.tls.ca_file: cannot read {tls.ca_file}: {exc.strerror}"
            ) from exc
        if tls.cert_file is not None and tls.key_file is not None:
            for field, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
                if not Path(path).is_file():
                    raise LinkConfigError(f"broker.tls.{field}: {path} does not exist")
            try:
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            except ssl.SSLError as exc:
                raise LinkConfigError(
                    f"broker.tls.cert_file/key_file: {tls.cert_file} and {tls.key_file} are not "
                    f"a PEM certificate and its private key ({exc.reason})"
                ) from exc
            except OSError as exc:
                raise LinkConfigError(
                    f"broker.tls.cert_file/key_file: cannot read {tls.cert_file} or "
                    f"{tls.key_file}: {exc.strerror or exc}"
                ) from exc
        context.check_hostname = tls.check_hostname
        return context


def _read_password_file(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LinkConfigError(
            f"broker.password_file: cannot read {path}: {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise LinkConfigError(f"broker.password_file: {path} is not UTF-8 text") from exc
    password = text.rstrip("\r\n")
    if not password:
        raise LinkConfigError(f"broker.password_file: {path} is empty")
    return password


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _connect_in_thread(client: mqtt.Client, host: str, port: int, keepalive: int) -> None:
    """``client.connect()`` (blocking: DNS, TCP, TLS) on a daemon thread.

    A daemon thread rather than the default executor: an attempt stuck in a TCP
    connect must not hold up interpreter exit. If the awaiting task is cancelled the
    thread's hand-back closes the fresh connection with DISCONNECT (no will).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def hand_back(error: BaseException | None) -> None:
        if future.cancelled():
            if error is None:
                _close_abandoned(client)
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def work() -> None:
        error: BaseException | None = None
        try:
            client.connect(host, port, keepalive, clean_start=True)
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(hand_back, error)
        except RuntimeError:  # the event loop is gone: nobody will use this connection
            if error is None:
                _close_abandoned(client)

    threading.Thread(target=work, name=f"mqtt-connect-{host}:{port}", daemon=True).start()
    await future


def _close_abandoned(client: mqtt.Client) -> None:
    client.on_disconnect = None
    client.on_log = None
    with contextlib.suppress(Exception):
        client.disconnect()
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()

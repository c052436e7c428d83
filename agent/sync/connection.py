"""One paho client and its socket, driven by the event loop (see ``link.py``'s docstring).

Also the blocking connect on a short-lived daemon thread, and the abandoned attempt's
clean-up: the only places paho runs outside the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.sync.messages import (
    LinkDown,
    LinkError,
    PublishRejected,
    SubscribeRejected,
    Traffic,
)
from agent.sync.routing import Filter

logger = logging.getLogger(__name__)

SOCKET_ERROR_PREFIX = "failed to receive on socket: "  # paho's log text for send/recv errors


def mqtt_properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def json_properties(packet_type: int) -> Properties:
    props = mqtt_properties(packet_type)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    return props


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reason_text(reason: ReasonCode | int) -> str:
    if isinstance(reason, ReasonCode):
        return str(reason)
    return mqtt.error_string(reason)


@dataclass
class Pending:
    future: asyncio.Future[None]
    started: float
    topic: str


@dataclass(frozen=True)
class Outcome:
    kind: str  # lost | unreachable | tls | tls_closed | refused | closed
    detail: str
    uptime_s: float = 0.0


class Connection:
    """One paho client and its socket, driven by the event loop (see module doc)."""

    def __init__(
        self,
        client: mqtt.Client,
        loop: asyncio.AbstractEventLoop,
        *,
        url: str,
        traffic: Traffic,
        connected: asyncio.Event,
        on_message: Callable[[mqtt.MQTTMessage], None],
    ) -> None:
        self.url = url
        self.traffic = traffic
        self.connected = connected  # the link's gate: closed here the moment we are
        self.on_message = on_message
        self.client = client
        self.loop = loop
        self.connack: asyncio.Future[tuple[ReasonCode, Properties | None]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.established = False
        self.disconnect_reason: str | None = None
        self.socket_error: str | None = None
        self.pending: dict[int, Pending] = {}
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
            self.connected.clear()
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
        self.on_message(msg)

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
        self.traffic.publish_rtt_ms = (time.monotonic() - pending.started) * 1000.0
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
        if level == mqtt.MQTT_LOG_ERR and text.startswith(SOCKET_ERROR_PREFIX):
            self.socket_error = text.removeprefix(SOCKET_ERROR_PREFIX)
        if text.startswith("Sending PINGREQ"):
            self._ping_sent = time.monotonic()
        elif text.startswith("Received PINGRESP") and self._ping_sent is not None:
            self.traffic.ping_rtt_ms = (time.monotonic() - self._ping_sent) * 1000.0
            self._ping_sent = None
        logger.debug("paho: %s", text)

    # -- requests ---------------------------------------------------------------------

    def start_publish(
        self, topic: str, data: bytes, qos: int, retain: bool, is_json: bool
    ) -> asyncio.Future[None] | None:
        """Queue a publish; for QoS > 0 return the future of its acknowledgement."""
        props = json_properties(PacketTypes.PUBLISH) if is_json else None
        info = self.client.publish(topic, data, qos=qos, retain=retain, properties=props)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise LinkDown(f"connection to {self.url} is closing; publish to {topic!r} not sent")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        self.traffic.published += 1
        if qos == 0:
            return None
        future: asyncio.Future[None] = self.loop.create_future()
        self.pending[info.mid] = Pending(future, time.monotonic(), topic)
        return future

    def start_subscribe(self, entry: Filter) -> asyncio.Future[None]:
        props: Properties | None = None
        if self.sub_ids_supported:
            props = mqtt_properties(PacketTypes.SUBSCRIBE)
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


def consume_failure(future: asyncio.Future[None], what: str) -> None:
    """Done-callback for futures nobody awaits: log failures instead of losing them."""
    if future.cancelled():
        return
    exc = future.exception()
    if isinstance(exc, LinkDown):
        logger.debug("%s: %s", what, exc)
    elif exc is not None:
        logger.error("%s: %s", what, exc)


def describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def connect_in_thread(client: mqtt.Client, host: str, port: int, keepalive: int) -> None:
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
                close_abandoned(client)
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
                close_abandoned(client)

    threading.Thread(target=work, name=f"mqtt-connect-{host}:{port}", daemon=True).start()
    await future


def close_abandoned(client: mqtt.Client) -> None:
    client.on_disconnect = None
    client.on_log = None
    with contextlib.suppress(Exception):
        client.disconnect()
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()

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
import datetime as dt
import functools
import logging
import random
import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes

from agent.aio import first_done
from agent.backoff import backoff_delay
from agent.config import BROKER_URL_PATTERN, BrokerConfig, IdentityConfig
from agent.contracts import DeviceState, StateStatus, iso_time
from agent.sync.connection import (
    Connection,
    Outcome,
    connect_in_thread,
    consume_failure,
    describe_os_error,
    json_properties,
    utc_now,
)
from agent.sync.credentials import Credentials, load_credentials
from agent.sync.messages import (
    LinkAuthError,
    LinkConfigError,
    LinkDown,
    LinkError,
    LinkStats,
    Message,
    Payload,
    SubscribeRejected,
    Traffic,
    encode_payload,
)
from agent.sync.routing import Filter, Subscription
from agent.sync.topics import Topics

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake, in the connect thread
GOODBYE_TIMEOUT_S = 0.5  # wait this long for the PUBACK of the "shutdown" state
STABLE_AFTER_S = 10.0  # a connection this old resets the backoff to its first step
FAST_RETRY_S = 60.0  # after losing a stable connection, retry often for this long...
FAST_RETRY_MAX_S = 3.0  # ...at most this far apart (lessons resume within seconds)
TLS_CLOSE_LIMIT = 2  # bare TLS closes before CONNACK (before any success) meaning "rejected"
DEFAULT_QUEUE_SIZE = 256
_AUTH_REASONS = {
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
}


# -- errors -----------------------------------------------------------------------------


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
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        # Set once the first attempt has ended either way (connected, or failed in a way
        # a retry may fix): what "started" means for the link (`wait_ready`).
        self._tried = asyncio.Event()
        self._credentials: Credentials | None = None
        self._filters: dict[str, Filter] = {}
        self._by_sub_id: dict[int, Filter] = {}
        self._next_sub_id = 1

        self._seq = 0
        self._ever_connected = False
        self._connected_since: str | None = None
        self._attempts = 0
        self._connects = 0
        self._disconnects = 0
        self._last_error: str | None = None
        self._received = 0
        self._dropped_publishes = 0
        self._traffic = Traffic()
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

    async def wait_ready(self) -> None:
        """Until the first connection attempt has ended: connected, or failed in a way a
        retry may fix (refused credentials end ``run()`` instead). Not a promise that the
        broker is up: a room starts and works without it."""
        await first_done(self._tried.wait(), self._connected.wait())

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
            published=self._traffic.published,
            received=self._received,
            dropped_publishes=self._dropped_publishes,
            dropped_messages=self._traffic.dropped_messages,
            publish_rtt_ms=self._traffic.publish_rtt_ms,
            ping_rtt_ms=self._traffic.ping_rtt_ms,
        )

    def _load_credentials(self, previous: Credentials | None) -> Credentials:
        return load_credentials(
            self.broker, self.identity, self.url, tls=self._tls, previous=previous
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
                if outcome.kind != "tls_closed" or self._ever_connected:
                    self._tried.set()  # a bare TLS close is believed only twice: wait for it
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

    async def _connect_and_serve(self) -> Outcome:
        self._seq += 1
        self._attempts += 1
        seq = self._seq
        client = self._new_client(seq)
        # Callbacks are installed before connect() so that an error paho meets while
        # sending CONNECT (on the connect thread) is still recorded.
        conn = Connection(
            client,
            asyncio.get_running_loop(),
            url=self.url,
            traffic=self._traffic,
            connected=self._connected,
            on_message=self._route,
        )
        try:
            await connect_in_thread(client, self._host, self._port, self.broker.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            return Outcome("tls", f"certificate verify failed: {exc.verify_message or exc}")
        except ssl.SSLError as exc:
            detail = exc.reason or str(exc)
            # An alert during the handshake (TLS 1.2) is the broker refusing us, most
            # likely our client certificate; under TLS 1.3 it comes after CONNECT.
            return Outcome("tls_closed" if "ALERT" in detail.upper() else "tls", detail)
        except (OSError, ValueError) as exc:
            return Outcome("unreachable", describe_os_error(exc))

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
                return Outcome("closed", f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s")
            if not conn.connack.done():
                detail = conn.disconnect_reason or "connection closed before CONNACK"
                why = detail
                return Outcome("tls_closed" if self._tls else "closed", detail)
            reason, _props = conn.connack.result()
            if reason.is_failure:
                why = str(reason)
                return Outcome("refused", str(reason))
            if conn.closed.done():  # accepted, then dropped at once (e.g. taken over)
                why = conn.disconnect_reason or "connection closed after CONNACK"
                return Outcome("closed", why)

            started = time.monotonic()
            self._established(conn, seq)
            try:
                await conn.closed
            except asyncio.CancelledError:
                await self._goodbye(conn, seq)
                raise
            why = conn.disconnect_reason or "connection lost"
            return Outcome("lost", why, time.monotonic() - started)
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
            properties=json_properties(PacketTypes.WILLMESSAGE),
        )
        return client

    def _established(self, conn: Connection, seq: int) -> None:
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
                functools.partial(consume_failure, what=f"subscribe to {entry.topic_filter!r}")
            )
        self._connected_since = utc_now()
        if self.announce:
            birth = self._state_payload("online", seq, connected_at=self._connected_since)
            data, _ = encode_payload(birth)
            try:
                future = conn.start_publish(self.topics.state, data, 1, True, True)
            except LinkDown:
                return  # closed under us; conn.closed is done and run() moves on
            if future is not None:
                future.add_done_callback(lambda f: consume_failure(f, "birth message"))
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

    async def _goodbye(self, conn: Connection, seq: int) -> None:
        """Retained offline/shutdown, then DISCONNECT (which discards the will)."""
        self._connected.clear()
        try:
            payload = self._state_payload(
                "offline", seq, reason="shutdown", disconnected_at=utc_now()
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
                future.add_done_callback(lambda f: consume_failure(f, "shutdown state"))
            conn.client.disconnect()
            conn.flush()
            logger.info("disconnected from %s (shutdown), seq %d", self.url, seq)
        except LinkError as exc:
            logger.warning("could not say goodbye to %s: %s", self.url, exc)

    def _after_attempt(self, outcome: Outcome) -> None:
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

    def _raise_if_fatal(self, outcome: Outcome) -> None:
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

    def _describe_failure(self, outcome: Outcome) -> str:
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

    def _state_payload(
        self,
        status: StateStatus,
        seq: int,
        *,
        reason: str | None = None,
        connected_at: str | None = None,
        disconnected_at: str | None = None,
    ) -> dict[str, Any]:
        # boot_time in milliseconds: an agent restarted within the same second (a
        # reload, a test) must still order after its previous run (DeviceState.order).
        return DeviceState(
            status=status,
            seq=seq,
            boot_time=iso_time(self.boot_time),
            device=self.identity.device_id,
            site=self.identity.site,
            room=self.identity.room,
            version=self.software_version,
            profile=self.profile_name,
            display_name=self.identity.display_name,
            connected_at=connected_at,
            disconnected_at=disconnected_at,
            reason=reason,
        ).to_dict()

    # -- subscriptions ----------------------------------------------------------------

    async def _add_subscription(self, sub: Subscription) -> None:
        entry = self._filters.get(sub.topic_filter)
        send = False
        if entry is None:
            entry = Filter(sub.topic_filter, self._next_sub_id, sub.qos, [])
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
        targets: list[Filter]
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

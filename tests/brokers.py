"""Real Mosquitto brokers for tests (fixtures), a plain paho observer, and link helpers.

Fixtures (re-exported by ``tests/conftest.py``):

``mosquitto``
    A started `BrokerUnderTest` (plain listener on 127.0.0.1, function scope):
    anonymous clients may do anything; the users in ``broker.users`` (two devices,
    ``admin`` and ``dashboard``) are held to the fleet ACL of `agent.broker.acl`,
    rendered for this test's unique ``broker.prefix``.
``tls_material``
    `agent.sync.PkiMaterial` in ``tmp_path`` (CA, broker cert, one client cert per
    device id plus ``admin``, an expired cert, a cert from a rogue CA).
``mosquitto_tls``
    Like ``mosquitto`` but one TLS listener with ``require_certificate`` and no
    anonymous access: clients need a certificate of the test CA *and* a password.

``broker.broker_config(user)`` gives a `BrokerConfig` for this broker (URL, unique
prefix, password file, client certificate, fast reconnects) and
``broker.identity(device_id)`` the matching `IdentityConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import BrokerTls, MosquittoBroker, render_acl
from agent.config.models import BrokerConfig, IdentityConfig, TlsConfig
from agent.runtime.supervisor import Service
from agent.sync import Message, MqttLink
from agent.testkit import make_test_pki
from agent.testkit.pki import PkiMaterial

DEVICE_1 = "school1.room1"
DEVICE_2 = "school1.room2"
TEST_DEVICES = (
    IdentityConfig(
        site="school1",
        room="room1",
        groups=[{"group": "music", "role": "main", "receivers": ["school1.room2"]}],
    ),
    IdentityConfig(site="school1", room="room2", groups=[{"group": "music", "role": "receiving"}]),
)
ADMIN = "admin"
DASHBOARD = "dashboard"


def unique_prefix() -> str:
    """A topic prefix of its own for one test (a valid config slug)."""
    return f"t{uuid.uuid4().hex[:12]}"


class BrokerUnderTest(MosquittoBroker):
    """A `MosquittoBroker` that knows its test users, prefix and TLS material."""

    def __init__(
        self,
        *,
        tmp_path: Path,
        prefix: str,
        tls_material: PkiMaterial | None = None,
        **kwargs: Any,
    ) -> None:
        users = {
            DEVICE_1: f"pw-{uuid.uuid4().hex[:8]}",
            DEVICE_2: f"pw-{uuid.uuid4().hex[:8]}",
            ADMIN: f"pw-{uuid.uuid4().hex[:8]}",
            DASHBOARD: f"pw-{uuid.uuid4().hex[:8]}",
        }
        anonymous = "readwrite" if kwargs.get("allow_anonymous", True) else None
        acl = render_acl(
            TEST_DEVICES, prefix=prefix, admins=[ADMIN], readers=[DASHBOARD], anonymous=anonymous
        )
        super().__init__(users=users, acl=acl, **kwargs)
        self.prefix = prefix
        self.devices = TEST_DEVICES
        self.tmp_path = tmp_path
        self.tls_material = tls_material

    def password(self, user: str) -> str:
        return self.users[user]

    def password_file(self, user: str) -> Path:
        """A file holding ``user``'s password (as ``broker.password_file`` expects)."""
        path = self.tmp_path / f"{user}.password"
        path.write_text(self.users[user] + "\n")
        path.chmod(0o600)
        return path

    def identity(self, device_id: str = DEVICE_1) -> IdentityConfig:
        for identity in self.devices:
            if identity.device_id == device_id:
                return identity
        site, room = device_id.split(".")
        return IdentityConfig(site=site, room=room)

    def broker_config(self, user: str | None = None, **overrides: Any) -> BrokerConfig:
        """`BrokerConfig` for this broker; ``user`` None = anonymous (plain listener).

        On the TLS broker ``user`` also picks the client certificate (CN = user).
        """
        values: dict[str, Any] = {
            "url": self.url,
            "topic_prefix": self.prefix,
            "keepalive_s": 5,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
        }
        if user is not None:
            values["username"] = user
            values["password_file"] = self.password_file(user)
        if self.tls_material is not None:
            pair = self.tls_material.clients.get(user or "")
            values["tls"] = TlsConfig(
                ca_file=self.tls_material.ca_cert,
                cert_file=pair.cert if pair else None,
                key_file=pair.key if pair else None,
            )
        values.update(overrides)
        return BrokerConfig(**values)

    def client_ssl_context(self, user: str) -> ssl.SSLContext | None:
        if self.tls_material is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_material.ca_cert))
        pair = self.tls_material.client(user)
        context.load_cert_chain(str(pair.cert), str(pair.key))
        return context


@pytest.fixture
def tls_material(tmp_path: Path) -> PkiMaterial:
    return make_test_pki(tmp_path / "pki", device_ids=(DEVICE_1, DEVICE_2, ADMIN))


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[BrokerUnderTest]:
    broker = BrokerUnderTest(tmp_path=tmp_path, prefix=unique_prefix())
    try:
        await broker.start()
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def mosquitto_tls(
    tmp_path: Path, tls_material: PkiMaterial
) -> AsyncIterator[BrokerUnderTest]:
    broker = BrokerUnderTest(
        tmp_path=tmp_path,
        prefix=unique_prefix(),
        tls_material=tls_material,
        allow_anonymous=False,
        tls=BrokerTls(
            ca_file=tls_material.ca_cert,
            cert_file=tls_material.server.cert,
            key_file=tls_material.server.key,
            require_certificate=True,
        ),
    )
    try:
        await broker.start()
        yield broker
    finally:
        await broker.close()


# -- helpers ----------------------------------------------------------------------------


async def eventually(
    condition: Callable[[], bool], within: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``condition()`` is true (polls; fails the test after ``within`` s)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(link: MqttLink, *, connect: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``link.run()`` in a task; cancel and await it on exit."""
    task = asyncio.create_task(link.run(), name=f"test-link-{link.identity.device_id}")
    try:
        if connect:
            waiter = asyncio.ensure_future(link.wait_connected())
            done, _ = await asyncio.wait(
                {waiter, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
                if task.done():
                    task.result()  # raises the link's error
                pytest.fail("link did not connect within 10 s")
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_link(
    broker: BrokerUnderTest, user: str | None = None, device: str = DEVICE_1, **overrides: Any
) -> MqttLink:
    return MqttLink(
        broker.broker_config(user, **overrides),
        broker.identity(device),
        software_version="0.0.0-test",
        profile_name="test-kit",
    )


class MqttObserver:
    """A plain paho client on its own network thread that records what it receives.

    Independent of `MqttLink` on purpose: tests check the link against a client that
    shares none of its code.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"observer-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if ssl_context is not None:
            self._client.tls_set_context(ssl_context)
        self._client.on_message = self._on_message

    @classmethod
    def for_broker(cls, broker: BrokerUnderTest, user: str | None = None) -> MqttObserver:
        if broker.tls_material is not None:
            user = user or ADMIN
        return cls(
            broker.url,
            username=user,
            password=broker.password(user) if user else None,
            ssl_context=broker.client_ssl_context(user) if user else None,
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos)
        with self._lock:
            self.messages.append(message)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._event.set)

    def _connect_blocking(self, filters: tuple[str, ...]) -> None:
        connected = threading.Event()
        subscribed = threading.Event()
        reasons: list[Any] = []

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            reasons.append(rc)
            connected.set()

        self._client.on_connect = on_connect
        self._client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self._client.connect(self.host, self.port, keepalive=10)
        self._client.loop_start()
        if not connected.wait(10) or reasons[0].is_failure:
            self._client.loop_stop()  # a refused observer leaves no network thread behind
            if not reasons:
                raise TimeoutError("observer did not connect")
            raise ConnectionError(f"observer refused by the broker: {reasons[0]}")
        for topic_filter in filters:
            subscribed.clear()
            self._client.subscribe(topic_filter, qos=1)
            if not subscribed.wait(10):
                raise TimeoutError(f"observer did not get a SUBACK for {topic_filter}")

    async def start(self, *filters: str) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._connect_blocking, filters)

    async def stop(self) -> None:
        def stop_blocking() -> None:
            self._client.disconnect()
            self._client.loop_stop()

        await asyncio.to_thread(stop_blocking)
        self._loop = None

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        def publish_blocking() -> None:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            info.wait_for_publish(10)

        await asyncio.to_thread(publish_blocking)

    def received(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    async def wait_for(
        self,
        topic: str,
        predicate: Callable[[Message], bool] = lambda m: True,
        within: float = 10.0,
    ) -> Message:
        """The first message on ``topic`` that satisfies ``predicate`` (waits for it)."""
        deadline = time.monotonic() + within
        while True:
            self._event.clear()
            for message in self.received(topic):
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [m.payload[:200] for m in self.received(topic)]
                pytest.fail(f"no matching message on {topic} within {within} s; saw {seen}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)


@contextlib.asynccontextmanager
async def observing(
    broker: BrokerUnderTest, *filters: str, user: str | None = None
) -> AsyncIterator[MqttObserver]:
    observer = MqttObserver.for_broker(broker, user)
    await observer.start(*filters)
    try:
        yield observer
    finally:
        await observer.stop()


async def first(awaitable: Awaitable[Any], within: float = 10.0) -> Any:
    """``awaitable`` with a test deadline."""
    return await asyncio.wait_for(awaitable, within)


@contextlib.asynccontextmanager
async def serving(*services: Service) -> AsyncIterator[None]:
    """Run services as tasks; cancel and await them on exit."""
    tasks = [asyncio.create_task(s.run(), name=f"test-{s.name}") for s in services]
    try:
        yield
        for task in tasks:
            if task.done():
                task.result()  # a service that died: show why
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

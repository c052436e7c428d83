"""The broker security shipped in the repo: ``broker/mosquitto.conf`` and the credentials
tool (`agent.broker.credentials`), proven on a real Mosquitto.

The tool builds a fleet directory (CA, broker certificate, per-client certificates and
passwords, ACL from fleet.yaml) exactly as an operator would; the broker runs the
shipped configuration with only its paths and port changed (``render_broker_config``),
from a copy of that directory that keeps the tool's owners and modes. Clients are the
agent's own `MqttLink` and a plain paho client.

What tests/test_link.py already proves against the test fixtures (a foreign publish is
refused, commands reach only their room) is not repeated; this file is about the shipped
configuration and the tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import pwd
import shutil
import signal
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.broker.credentials import (
    SHIPPED_CONFIG,
    CredentialsError,
    add_client,
    create_ca,
    init_broker_dir,
    issue_certificate,
    load_inventory,
    main,
    remove_client,
    render_broker_config,
)
from agent.broker.embedded import find_mosquitto, free_loopback_port
from agent.config.models import BrokerConfig, IdentityConfig, TlsConfig
from agent.sync import (
    LinkAuthError,
    LinkConfigError,
    LinkDown,
    MqttLink,
    PublishRejected,
    Topics,
)
from tests.brokers import MqttObserver, eventually, first, running

ROOM1 = "school1.room1"
ROOM2 = "school1.room2"
FLEET = {
    "prefix": "edu",
    "devices": [
        {
            "site": "school1",
            "room": "room1",
            "groups": [{"group": "music", "role": "main", "receivers": [ROOM2]}],
        },
        {"site": "school1", "room": "room2", "groups": [{"group": "music", "role": "receiving"}]},
    ],
    "admins": ["it"],
    "readers": ["dashboard"],
}
TOPICS1 = Topics("edu", "school1", "room1")
TOPICS2 = Topics("edu", "school1", "room2")

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


# -- the fleet directory, made by the tool ------------------------------------------------


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "broker"
    init_broker_dir(directory, server_names=["localhost", "127.0.0.1"])
    (directory / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
    for name in (ROOM1, ROOM2, "it", "dashboard"):
        add_client(directory, name)
    return directory


class ShippedBroker:
    """Mosquitto running ``broker/mosquitto.conf`` on a loopback port.

    The fleet directory is copied (owners and modes kept) to a directory under the
    system temp dir, because Mosquitto started as root drops to the ``mosquitto`` user,
    which cannot enter pytest's tmp_path.
    """

    FILES = ("ca.pem", "server.pem", "server.key", "passwd", "acl")

    def __init__(self, fleet: Path) -> None:
        self.fleet = fleet
        self.port = free_loopback_port()
        self.url = f"mqtts://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix="agent-shipped-broker-"))
        self.data = self.work / "data"
        self.log = self.work / "mosquitto.log"
        self.process: asyncio.subprocess.Process | None = None

    def _prepare(self) -> None:
        shutil.copystat(self.fleet, self.work)
        stat_ = self.fleet.stat()
        os.chown(self.work, stat_.st_uid, stat_.st_gid)
        self.copy_files()
        self.data.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("mosquitto")
            os.chown(self.data, user.pw_uid, user.pw_gid)
        config = render_broker_config(
            SHIPPED_CONFIG.read_text(),
            conf_dir=self.work,
            data_dir=self.data,
            port=self.port,
            bind="127.0.0.1",
            log_to_stderr=True,
            pid_file=self.data / "mosquitto.pid",
        )
        (self.work / "mosquitto.conf").write_text(config)

    def copy_files(self) -> None:
        for name in self.FILES:
            source, target = self.fleet / name, self.work / name
            shutil.copy2(source, target)
            stat_ = source.stat()
            os.chown(target, stat_.st_uid, stat_.st_gid)

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare)
        binary = find_mosquitto()
        assert binary is not None
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(self.work / "mosquitto.conf"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while " running" not in self.log_text():
            if self.process.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"shipped mosquitto.conf did not start:\n{self.log_text()}")
            await asyncio.sleep(0.05)

    async def reload(self) -> None:
        """What `systemctl reload mosquitto` does after the tool changed the files."""
        await asyncio.to_thread(self.copy_files)
        assert self.process is not None
        marker = self.log_text().count("Reloading config")
        self.process.send_signal(signal.SIGHUP)
        await eventually(
            lambda: self.log_text().count("Reloading config") > marker, what="a reload"
        )

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    # -- clients ------------------------------------------------------------------------

    def link(self, name: str, **tls_overrides: Any) -> MqttLink:
        """The agent's link, set up from the bundle the tool wrote for ``name``."""
        bundle = self.fleet / "clients" / name
        site, _, room = name.partition(".")
        identity = IdentityConfig(site=site, room=room or "observer")
        tls = TlsConfig(
            ca_file=bundle / "ca.pem",
            cert_file=bundle / "client.pem",
            key_file=bundle / "client.key",
        ).model_copy(update=tls_overrides)
        config = BrokerConfig(
            url=self.url,
            username=name,
            password_file=bundle / "password",
            tls=tls,
            keepalive_s=5,
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
        )
        return MqttLink(
            config,
            identity,
            software_version="test",
            profile_name="test",
            announce="." in name,  # roles observe; devices announce themselves
        )

    def observer(self, name: str) -> MqttObserver:
        bundle = self.fleet / "clients" / name
        context = ssl.create_default_context(cafile=str(bundle / "ca.pem"))
        context.load_cert_chain(str(bundle / "client.pem"), str(bundle / "client.key"))
        password = (bundle / "password").read_text().strip()
        return MqttObserver(self.url, username=name, password=password, ssl_context=context)


@pytest.fixture
async def shipped(fleet_dir: Path) -> AsyncIterator[ShippedBroker]:
    broker = ShippedBroker(fleet_dir)
    try:
        await broker.start()
        yield broker
    finally:
        await broker.stop()
        broker.cleanup()


@contextlib.asynccontextmanager
async def observing(broker: ShippedBroker, name: str, *filters: str) -> AsyncIterator[Any]:
    observer = broker.observer(name)
    await observer.start(*filters)
    try:
        yield observer
    finally:
        await observer.stop()


# -- the tool -----------------------------------------------------------------------------


def test_tool_writes_a_complete_fleet_directory(fleet_dir: Path) -> None:
    ca = x509.load_pem_x509_certificate((fleet_dir / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((fleet_dir / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert server.issuer == ca.subject

    bundle = fleet_dir / "clients" / ROOM1
    client = x509.load_pem_x509_certificate((bundle / "client.pem").read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ROOM1
    assert client.issuer == ca.subject
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (bundle / "ca.pem").read_bytes() == (fleet_dir / "ca.pem").read_bytes()
    for secret in (fleet_dir / "ca.key", bundle / "client.key", bundle / "password"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    for broker_secret in ("server.key", "passwd", "acl"):
        mode = stat.S_IMODE((fleet_dir / broker_secret).stat().st_mode)
        assert mode & 0o007 == 0, f"{broker_secret} is world-readable"

    password = (bundle / "password").read_text().strip()
    assert len(password) >= 32
    passwd = dict(line.split(":", 1) for line in (fleet_dir / "passwd").read_text().splitlines())
    assert set(passwd) == {ROOM1, ROOM2, "it", "dashboard"}
    assert all(digest.startswith("$7$101$") for digest in passwd.values())
    assert password not in (fleet_dir / "passwd").read_text()

    acl = (fleet_dir / "acl").read_text().splitlines()
    assert f"user {ROOM1}" in acl
    assert "topic readwrite edu/lesson/music" in acl
    assert "topic read edu/#" in acl[acl.index("user dashboard") :]
    assert "topic write homeassistant/sensor/school1_room1/+/config" in acl

    snippet = yaml.safe_load((bundle / "broker.yaml").read_text())
    assert snippet["identity"] == {
        "site": "school1",
        "room": "room1",
        "groups": [{"group": "music", "role": "main", "receivers": [ROOM2]}],
    }
    assert snippet["broker"]["tls"]["cert_file"] == "/etc/classroom-agent/device.pem"
    assert not (fleet_dir / "clients" / "it" / "broker.yaml").exists()  # roles are not devices


def test_tool_refuses_what_would_break_the_fleet(fleet_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"already has a CA; replacing it would lock"):
        create_ca(fleet_dir)
    with pytest.raises(CredentialsError, match=r"'school1.room9' is not in .*fleet.yaml"):
        add_client(fleet_dir, "school1.room9")
    old_hash = (fleet_dir / "passwd").read_text()
    rotated = add_client(fleet_dir, ROOM1)  # rotation: a new password and certificate
    assert (fleet_dir / "passwd").read_text() != old_hash
    assert rotated.password == (rotated.password_file.read_text().strip())

    (fleet_dir / "fleet.yaml").write_text(
        yaml.safe_dump({**FLEET, "devices": [{"site": "school1", "rooom": "x"}]})
    )
    with pytest.raises(CredentialsError, match=r"devices\.0\.rooom: Extra inputs"):
        load_inventory(fleet_dir)
    (fleet_dir / "fleet.yaml").write_text(yaml.safe_dump({**FLEET, "admins": ["it", "it"]}))
    with pytest.raises(CredentialsError, match=r"listed more than once: it"):
        load_inventory(fleet_dir)
    with pytest.raises(CredentialsError, match=r"does not exist: run `classroom-agent broker"):
        load_inventory(tmp_path / "nowhere")


def test_cli_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    out = io.StringIO()
    directory = tmp_path / "b"
    assert main(["broker", "init", str(directory), "--host", "broker.example"], out) == 0
    assert "fleet.yaml" in out.getvalue()
    inventory = load_inventory(directory)  # the example inventory is valid as written
    assert [d.device_id for d in inventory.devices] == [
        "central-school.room-101",
        "rural-point-1.room-1",
    ]
    assert main(["broker", "add", str(directory), "central-school.room-101", "it"], out) == 0
    assert main(["broker", "add", str(directory), "nobody.here"], out) == 2
    assert "'nobody.here' is not in" in capsys.readouterr().err
    assert main(["broker", "config", "--dir", "/srv/mqtt", "--port", "9883"], out) == 0
    assert "listener 9883\n" in out.getvalue()
    assert "password_file /srv/mqtt/passwd\n" in out.getvalue()


def test_shipped_config_has_the_security_settings() -> None:
    lines = [line.split() for line in SHIPPED_CONFIG.read_text().splitlines()]
    settings = {words[0]: words[1:] for words in lines if words and not words[0].startswith("#")}
    assert settings["allow_anonymous"] == ["false"]
    assert settings["require_certificate"] == ["true"]
    assert settings["use_identity_as_username"] == ["false"]
    assert settings["listener"] == ["8883"]
    assert settings["persistence"] == ["true"]
    assert settings["max_packet_size"] == ["262144"]
    assert {"password_file", "acl_file", "max_inflight_messages", "max_queued_messages"} <= set(
        settings
    )
    assert sum(1 for words in lines if words and words[0] == "listener") == 1  # no plain 1883


# -- the shipped configuration, on a real broker -----------------------------------------------


async def test_a_device_stays_inside_its_own_room(shipped: ShippedBroker) -> None:
    device = shipped.link(ROOM1)
    async with (
        observing(shipped, "it", "edu/#") as it,
        running(device),
        device.subscribe("#") as everything,
    ):
        await device.publish(TOPICS1.health, {"ok": True}, qos=1)
        room2 = (TOPICS2.health, TOPICS2.state, TOPICS2.config_reported, TOPICS2.alert)
        for topic in (*room2, f"{TOPICS2.base}/probe"):
            with pytest.raises(PublishRejected):
                await device.publish(topic, {"spoof": True}, qos=1)
        with pytest.raises(PublishRejected):  # only IT writes a room's configuration
            await device.publish(TOPICS1.config_desired, {"evil": True}, qos=1, retain=True)

        # '#' is granted but delivers only what the ACL lets this device read.
        await it.publish(TOPICS2.cmd("ping"), '{"id": "for room2"}')
        await it.publish(TOPICS2.config_desired, '{"for": "room2"}', retain=True)
        await it.publish(TOPICS1.config_desired, '{"for": "room1"}', retain=True)
        # Lesson peers may read every room's online state (a main room's Last Will ends
        # its rooms' attempts at once); of other rooms, nothing else.
        seen = [await first(everything.get())]
        with contextlib.suppress(TimeoutError):  # anything else would have arrived by now
            while True:
                seen.append(await asyncio.wait_for(everything.get(), 0.5))
        assert [m.topic for m in seen if not m.topic.endswith("/state")] == [TOPICS1.config_desired]
        # Its own probe topic (the self-test's round trip) it may write and read.
        await device.publish(f"{TOPICS1.base}/probe", {"selftest": 1}, qos=1)
        assert (await first(everything.get())).topic == f"{TOPICS1.base}/probe"
        assert device.is_connected
    assert [m.json() for m in it.received(TOPICS1.health)] == [{"ok": True}]
    assert not it.received(TOPICS2.health)


async def test_nobody_pushes_media_through_the_broker(shipped: ShippedBroker) -> None:
    device = shipped.link(ROOM1)
    async with observing(shipped, "it", TOPICS1.sensing) as it, running(device):
        await device.publish(TOPICS1.sensing, {"faces": 3}, qos=1)
        with pytest.raises(LinkDown):  # a 300 kB "frame": the broker drops the sender
            await device.publish(TOPICS1.sensing, b"\xff" * 300_000, qos=1)
        await first(device.wait_connected(), within=20)  # it reconnects, of course
        await device.publish(TOPICS1.sensing, {"faces": 4}, qos=1)
        await it.wait_for(TOPICS1.sensing, lambda m: m.payload == b'{"faces":4}')
    assert [m.json() for m in it.received(TOPICS1.sensing)] == [{"faces": 3}, {"faces": 4}]


async def test_the_dashboard_reads_everything_and_writes_nothing(shipped: ShippedBroker) -> None:
    device = shipped.link(ROOM1)
    dashboard = shipped.link("dashboard")
    async with running(dashboard), dashboard.subscribe("edu/#") as fleet, running(device):
        await device.publish(TOPICS1.health, {"cpu_percent": 12}, qos=1)
        seen = await first(_next_on(fleet, TOPICS1.health))
        assert seen.json() == {"cpu_percent": 12}
        for topic in (TOPICS1.health, TOPICS1.config_desired, TOPICS1.cmd("ping")):
            with pytest.raises(PublishRejected):
                await dashboard.publish(topic, {"x": 1}, qos=1)


async def _next_on(subscription: Any, topic: str) -> Any:
    while True:
        message = await subscription.get()
        if message.topic == topic:
            return message


async def test_refused_certificates_and_passwords(
    shipped: ShippedBroker, fleet_dir: Path, tmp_path: Path
) -> None:
    bundle = fleet_dir / "clients" / ROOM1
    # A certificate of the fleet CA whose validity has ended.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    expired = issue_certificate(fleet_dir, ROOM1, tmp_path / "expired", days=30, now=past)
    link = shipped.link(ROOM1, cert_file=expired.cert, key_file=expired.key)
    with pytest.raises(LinkConfigError, match=r"broker\.tls\.cert_file"):
        await first(link.run(), within=20)

    # A certificate with the right name from another CA (another fleet's, or forged).
    rogue_dir = tmp_path / "rogue"
    init_broker_dir(rogue_dir, server_names=["localhost"])
    rogue = issue_certificate(rogue_dir, ROOM1, tmp_path / "rogue-client")
    link = shipped.link(ROOM1, cert_file=rogue.cert, key_file=rogue.key)
    with pytest.raises(LinkConfigError, match=r"client certificate"):
        await first(link.run(), within=20)

    # No certificate at all: the password alone is not enough.
    link = shipped.link(ROOM1, cert_file=None, key_file=None)
    with pytest.raises(LinkConfigError):
        await first(link.run(), within=20)

    # The right certificate with a wrong password: refused too.
    (tmp_path / "wrong").write_text("not-the-password\n")
    config = shipped.link(ROOM1).broker.model_copy(update={"password_file": tmp_path / "wrong"})
    link = MqttLink(
        config, IdentityConfig(site="school1", room="room1"), software_version="t", profile_name="t"
    )
    with pytest.raises(LinkAuthError, match=r"refused the credentials for user 'school1.room1'"):
        await first(link.run(), within=20)
    assert (bundle / "password").exists()


async def test_a_removed_device_is_locked_out_after_reload(
    shipped: ShippedBroker, fleet_dir: Path
) -> None:
    remove_client(fleet_dir, ROOM2)
    assert f"user {ROOM2}" in (fleet_dir / "acl").read_text()  # still in fleet.yaml ...
    await shipped.reload()
    link = shipped.link(ROOM2)
    with pytest.raises(LinkAuthError):  # ... but without a password it cannot log in
        await first(link.run(), within=20)
    async with running(shipped.link(ROOM1)):  # the others are unaffected
        pass


async def test_retained_configuration_survives_a_broker_restart(shipped: ShippedBroker) -> None:
    async with observing(shipped, "it") as it:
        await it.publish(TOPICS1.config_desired, '{"profile": "v7"}', retain=True)
    await shipped.stop()
    await shipped.start()  # same directory: the persistence file is read back
    device = shipped.link(ROOM1)
    async with running(device), device.subscribe(TOPICS1.config_desired) as desired:
        message = await first(desired.get())
    assert message.retain
    assert message.json() == {"profile": "v7"}

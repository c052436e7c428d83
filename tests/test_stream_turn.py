"""Two rooms that cannot reach each other hold a lesson through a TURN relay.

The rural-school case: each room sits behind its own network (here a network
namespace with a veth pair to the root namespace) and the only thing both can reach is
the district server: Mosquitto and coturn (``/usr/bin/turnserver``) on one root-side
address. There is no route between the rooms (no default route in either namespace,
so ``ip_forward`` does not matter), which the test checks first at the socket level.
coturn may not relay to the rooms' own addresses (``--denied-peer-ip``), as a NAT in
front of each school would not let the relay in: the only path is relay to relay.

Then the same two ``classroom-agent run`` daemons (one per namespace) start the lesson
twice: without ``stream.ice_servers`` the receiving room must not go live (host
candidates only, nothing to reach), and with coturn named in ``stream.ice_servers`` it
must, with the main room's stamped frames arriving and coturn's log showing both rooms'
allocations relaying the lesson's media to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import BrokerUnderTest, MqttObserver, observing, unique_prefix
from tests.test_daemon import Daemon
from tests.test_stream_netns import NsDaemon
from tests.test_stream_rejoin import (
    GROUP,
    MAIN,
    ROOM2,
    both_online,
    joined,
    newer,
    room_config,
    start_lesson,
    stream_state,
)

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

TURNSERVER = Path("/usr/bin/turnserver")
TURN_PORT = 3478
TURN_USER = "test"
TURN_SECRET = "secret"
TURN_REALM = "classroom"
NO_RELAY_WINDOW_S = 8.0  # how long the rooms get to (not) connect without the relay
LIVE_TARGET_S = 30.0  # lesson-start to the receiving room live through the relay
MEDIA_BYTES = 30_000  # relayed per direction: media (ICE checks and consent: ~100 B each)


@dataclass(frozen=True)
class Rooms:
    """Two rooms' namespaces. ``server_ip`` (root side of room A's veth) is the district
    server: broker and relay; room B reaches it through a /32 route and nothing else."""

    ns_a: str
    ns_b: str
    ip_a: str
    ip_b: str
    server_ip: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def rooms() -> Iterator[Rooms]:
    """Namespaces cea-a-<tag> (10.78.N.2/24) and cea-b-<tag> (10.79.N.2/24), each with a
    veth to the root namespace (10.78.N.1, 10.79.N.1); room B has a route to 10.78.N.1
    only. Everything is removed in teardown whatever happened."""
    if not TURNSERVER.exists():
        pytest.skip(f"{TURNSERVER} is missing (Debian package coturn)")
    tag = uuid.uuid4().hex[:6]
    n = random.randint(1, 254)
    r = Rooms(f"cea-a-{tag}", f"cea-b-{tag}", f"10.78.{n}.2", f"10.79.{n}.2", f"10.78.{n}.1")
    host_a, host_b = f"ceata{tag}", f"ceatb{tag}"
    try:
        _ip("netns", "add", r.ns_a)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot create a network namespace here (ip netns add): {exc}")
    try:
        _ip("netns", "add", r.ns_b)
        for ns, host_if, ns_ip, gateway in (
            (r.ns_a, host_a, r.ip_a, r.server_ip),
            (r.ns_b, host_b, r.ip_b, f"10.79.{n}.1"),
        ):
            inner = f"{host_if}n"
            _ip("link", "add", host_if, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("addr", "add", f"{gateway}/24", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", r.ns_b, "route", "add", f"{r.server_ip}/32", "via", f"10.79.{n}.1")
        yield r
    finally:
        for host_if in (host_a, host_b):
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        for ns in (r.ns_a, r.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


# What one room can reach, checked from inside its namespace: a STUN Binding request to
# the relay must be answered (so must a TCP connect to the broker); a datagram to the
# other room must not even leave (no route).
_REACH = r"""
import json, os, socket, sys
server, turn_port, broker_port, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
txid = os.urandom(12)
out["stun"] = False
for _ in range(10):
    s.sendto(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + txid, (server, turn_port))
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    out["stun"] = data[:2] == b"\x01\x01" and data[8:20] == txid
    break
try:
    socket.create_connection((server, broker_port), timeout=5).close()
    out["broker"] = True
except OSError as exc:
    out["broker"] = str(exc)
try:
    s.sendto(b"hello", (other, 9))
    out["other"] = "sent"
except OSError as exc:
    out["other"] = exc.strerror
print(json.dumps(out))
"""


async def reach(namespace: str, *args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-c",
        _REACH,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


class Coturn:
    """``turnserver`` in the root namespace on ``ip``: one static long-term user, UDP only,
    verbose log to a file (which the test reads for allocations and relayed bytes)."""

    def __init__(self, ip: str, folder: Path, denied: tuple[str, ...] = ()) -> None:
        self.ip = ip
        self.denied = denied
        self.folder = folder
        self.log_path = folder / "turnserver.log"
        self.out_path = folder / "turnserver.out"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"turn:{self.ip}:{TURN_PORT}?transport=udp"

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.out_path.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                str(TURNSERVER),
                "-n",  # no /etc/turnserver.conf: only what is below
                f"--listening-ip={self.ip}",
                f"--relay-ip={self.ip}",
                f"--listening-port={TURN_PORT}",
                "--lt-cred-mech",
                f"--user={TURN_USER}:{TURN_SECRET}",
                f"--realm={TURN_REALM}",
                "--fingerprint",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--no-rfc5780",
                "--no-software-attribute",
                f"--userdb={self.folder / 'turndb'}",
                f"--pidfile={self.folder / 'turnserver.pid'}",
                *(f"--denied-peer-ip={address}" for address in self.denied),
                f"--log-file={self.log_path}",
                "--no-stdout-log",
                "--simple-log",
                "--verbose",
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    async def close(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def lesson_rooms(
    tmp_path: Path, name: str, broker: BrokerUnderTest, r: Rooms, ice_servers: list[Any]
) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """The main room's daemon in namespace A, the receiving room's in B (killed on exit
    if still running)."""
    daemons: list[Daemon] = []
    try:
        for device, namespace, ip in ((MAIN, r.ns_a, r.ip_a), (ROOM2, r.ns_b, r.ip_b)):
            folder = tmp_path / f"{name}-{device}"
            folder.mkdir()
            config = room_config(broker.url, broker.prefix, device, folder / "state", ice=ip)
            config["stream"]["ice_servers"] = ice_servers
            config["stream"]["panel_port"] = 0
            daemons.append(NsDaemon(folder, config, namespace))
        for daemon in daemons:
            await daemon.start()
        yield daemons[0], daemons[1]
    finally:
        for daemon in daemons:
            await daemon.close()


async def end_and_stop(it: MqttObserver, prefix: str, main: Daemon, room2: Daemon) -> None:
    end = f"{prefix}/school1/room1/cmd/lesson-end"
    seen = len(it.received(f"{end}/result"))
    await it.publish(end, json.dumps({"id": f"end-{uuid.uuid4().hex[:6]}", "args": {}}))
    result = await it.wait_for(
        f"{end}/result", lambda m: newer(it, f"{end}/result", m, seen), within=20
    )
    assert result.json()["ok"], result.json()
    for daemon in (main, room2):
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, daemon.log()
    for daemon in (main, room2):
        assert "Traceback" not in daemon.log(), daemon.log()


@dataclass
class TurnSession:
    """One allocation as coturn's verbose log tells it (figures: at its deletion)."""

    client: str | None = None  # the room's address
    peers: set[str] = field(default_factory=set)  # addresses it had permissions for
    usage: dict[str, int] = field(default_factory=dict)  # client side: rp, rb, sp, sb
    peer_usage: dict[str, int] = field(default_factory=dict)  # relayed side
    deleted: bool = False


_FIGURES = r"rp=(?P<rp>\d+), rb=(?P<rb>\d+), sp=(?P<sp>\d+), sb=(?P<sb>\d+)"


def turn_sessions(log_text: str) -> dict[str, TurnSession]:
    sessions: dict[str, TurnSession] = {}
    for line in log_text.splitlines():
        found = re.search(r"session (\d+): (.*)", line)
        if found is None:
            continue
        sid, rest = found.groups()
        if rest.startswith("new,"):
            sessions[sid] = TurnSession()
        session = sessions.get(sid)
        if session is None:
            continue
        if peer := re.match(r"peer ([\d.]+):\d+ lifetime updated", rest):
            session.peers.add(peer.group(1))
        elif figures := re.match(r"usage: .*" + _FIGURES, rest):
            session.usage = {k: int(v) for k, v in figures.groupdict().items()}
        elif figures := re.match(r"peer usage: .*" + _FIGURES, rest):
            session.peer_usage = {k: int(v) for k, v in figures.groupdict().items()}
        elif closed := re.search(r"closed \(2nd stage\).*remote ([\d.]+):\d+", rest):
            session.client = closed.group(1)
        elif rest.startswith("delete:"):
            session.deleted = True
    return sessions


async def all_deleted(turn: Coturn, within: float = 30.0) -> dict[str, TurnSession]:
    """coturn's sessions once every one has been deleted (its usage is logged then)."""
    deadline = time.monotonic() + within
    while True:
        sessions = turn_sessions(turn.log())
        if sessions and all(s.deleted for s in sessions.values()):
            return sessions
        if time.monotonic() > deadline:
            pytest.fail(f"coturn sessions not all deleted within {within} s: {sessions}")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_rooms_that_cannot_reach_each_other_go_live_through_the_turn_relay(
    rooms: Rooms, tmp_path: Path
) -> None:
    broker = BrokerUnderTest(tmp_path=tmp_path, prefix=unique_prefix(), host=rooms.server_ip)
    turn = Coturn(rooms.server_ip, tmp_path / "coturn", denied=(rooms.ip_a, rooms.ip_b))
    try:
        await broker.start()
        await turn.start()
        prefix = broker.prefix
        health = f"{prefix}/school1/room2/health"
        lesson_topic = f"{prefix}/lesson/{GROUP}"

        # The network: each room reaches the district server (relay and broker), never
        # the other room.
        for namespace, other in ((rooms.ns_a, rooms.ip_b), (rooms.ns_b, rooms.ip_a)):
            seen_net = await reach(
                namespace, rooms.server_ip, str(TURN_PORT), str(broker.port), other
            )
            assert seen_net["stun"] is True, (namespace, seen_net, turn.log())
            assert seen_net["broker"] is True, (namespace, seen_net)
            assert seen_net["other"] == "Network is unreachable", (namespace, seen_net)

        async with observing(broker, f"{prefix}/#") as it:
            states = [f"{prefix}/school1/{d}/state" for d in ("room1", "room2")]

            # 1. Host candidates only: the lesson is negotiated over MQTT but never live.
            seen = {t: len(it.received(t)) for t in states}
            async with lesson_rooms(tmp_path, "direct", broker, rooms, []) as (main, room2):
                await both_online(it, prefix, seen)
                seen_health = len(it.received(health))
                await start_lesson(it, prefix)
                deadline = time.monotonic() + NO_RELAY_WINDOW_S
                while time.monotonic() < deadline:
                    recent = it.received(health)[seen_health:]
                    early = [m for m in recent if stream_state(m) == "live"]
                    assert not early, f"live without a relay: {early[0].payload[:400]!r}"
                    assert all(ROOM2 not in joined(m) for m in it.received(lesson_topic))
                    await asyncio.sleep(0.2)  # polling what arrived, not a timed assertion
                tried = [m.json()["stream"] for m in it.received(health)[seen_health:]]
                tried = [s for s in tried if s is not None]
                assert tried, "room2 reported no lesson while it was announced"
                assert max(s["sessions_started"] for s in tried) >= 1, tried
                assert tried[-1]["state"] in ("joining", "reconnecting"), tried[-1]
                await end_and_stop(it, prefix, main, room2)
            assert "ALLOCATE" not in turn.log()

            # 2. The same rooms with coturn in stream.ice_servers: live through the relay.
            ice = [
                {"urls": [turn.url], "username": TURN_USER, "credential": TURN_SECRET},
            ]
            seen = {t: len(it.received(t)) for t in states}
            async with lesson_rooms(tmp_path, "relay", broker, rooms, ice) as (main, room2):
                await both_online(it, prefix, seen)
                seen_health = len(it.received(health))
                seen_lesson = len(it.received(lesson_topic))
                pressed = time.monotonic()
                await start_lesson(it, prefix)
                await it.wait_for(
                    lesson_topic,
                    lambda m: ROOM2 in joined(m) and newer(it, lesson_topic, m, seen_lesson),
                    within=60,
                )
                joined_s = time.monotonic() - pressed
                live = await it.wait_for(
                    health,
                    lambda m: stream_state(m) == "live" and newer(it, health, m, seen_health),
                    within=60,
                )
                live_s = time.monotonic() - pressed

                def frames_from_main(m: Any) -> int:
                    stream = m.json().get("stream") or {}
                    received = (stream.get("received") or {}).get(MAIN) or {}
                    return int(received.get("advanced") or 0)

                first = frames_from_main(live)
                flowing = await it.wait_for(
                    health,
                    lambda m: (
                        newer(it, health, m, seen_health) and frames_from_main(m) >= first + 30
                    ),
                    within=30,
                )
                stream = flowing.json()["stream"]
                received = stream["received"][MAIN]
                peer = stream["peers"][MAIN]
                assert peer["state"] == "connected", peer
                await end_and_stop(it, prefix, main, room2)

        # The media went relay to relay: each room's allocation exchanged the lesson's
        # media with the other room's relayed address (the only peer coturn allowed, the
        # rooms' own addresses being denied as peers, as a NAT would), far beyond what
        # ICE checks and consent amount to.
        sessions = await all_deleted(turn)
        relayed: dict[str, dict[str, int]] = {}
        for room_ip in (rooms.ip_a, rooms.ip_b):
            used = [s for s in sessions.values() if s.client == room_ip and s.peers]
            assert len(used) == 1, (room_ip, sessions)
            assert used[0].peers == {rooms.server_ip}, (room_ip, used[0])
            relayed[room_ip] = used[0].peer_usage
            assert min(used[0].peer_usage["rb"], used[0].peer_usage["sb"]) > MEDIA_BYTES, (
                room_ip,
                used[0],
            )
        log.info(
            "through the TURN relay: lesson-start -> room2 joined %.2f s, live (health) "
            "%.2f s; %s frames from the main room, glass-to-glass p50 %.0f ms p95 %.0f ms; "
            "coturn: %d allocations, relayed bytes main room sent %d received %d, "
            "receiving room sent %d received %d",
            joined_s,
            live_s,
            received["advanced"],
            received["latency_p50_ms"],
            received["latency_p95_ms"],
            len(sessions),
            relayed[rooms.ip_a]["sb"],
            relayed[rooms.ip_a]["rb"],
            relayed[rooms.ip_b]["sb"],
            relayed[rooms.ip_b]["rb"],
        )
        assert live_s < LIVE_TARGET_S, f"live through the relay after {live_s:.2f} s"
    finally:
        await turn.close()
        await broker.close()

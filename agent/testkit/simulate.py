"""Simulated classrooms for the dashboard's tests, its benchmark and its demo.

A `SimRoom` produces what a real agent publishes (docs/contracts.md): the retained
birth/death state with ``seq`` and ``boot_time``, health messages with realistic and
slowly drifting figures (CPU, temperature, disk, camera fps, microphone level, broker
round trip, the live lesson's stream statistics), and alert events with the health
message's ``alerts.active`` kept in step. `fleet_layout` spreads N rooms over schools
(a central school and rural teaching points) and lesson groups (one main room, three
receiving rooms).

Two ways to put them on a broker:

- `SimFleet`: many rooms over a few MQTT connections (``connections``), for the
  benchmark and the page's demo. The births are published for the rooms, so there is no
  per-room Last Will; `SimFleet.set_offline` publishes what a will would.
- `main` (``python -c "from agent.testkit.simulate import main; main()" --broker URL
  --room site.room``): one room in its own process over a real `MqttLink` (its own
  birth and Last Will), so a test can ``kill -9`` it and watch the broker announce the
  death.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import random
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config import BrokerConfig, IdentityConfig
from agent.sync import LinkError, MqttLink

logger = logging.getLogger(__name__)

SCHOOLS = (  # a central school, a town school and rural teaching points
    "central-school",
    "east-town-primary",
    "hillside",
    "river-bend",
    "pine-ridge",
    "north-lake",
    "stone-bridge",
    "maple-valley",
)
SUBJECTS = ("English", "Music", "Art", "Science", "Mathematics", "Chinese")
ROOMS_PER_SCHOOL = 10
VERSION = "0.1.0"
PROFILE = "intel-n100-uvc1080"


@dataclass(frozen=True)
class RoomSpec:
    site: str
    room: str
    name: str

    @property
    def device(self) -> str:
        return f"{self.site}.{self.room}"


@dataclass(frozen=True)
class GroupSpec:
    group: str
    subject: str
    main: str
    receiving: tuple[str, ...]
    live: bool


def fleet_layout(
    rooms: int, *, per_school: int = ROOMS_PER_SCHOOL, live_every: int = 3
) -> tuple[list[RoomSpec], list[GroupSpec]]:
    """``rooms`` rooms in schools of ``per_school``; lesson groups of four rooms (one
    main, three receiving, from different schools); every ``live_every``-th group live."""
    specs: list[RoomSpec] = []
    schools = max(1, -(-rooms // per_school))
    for s in range(schools):
        site = SCHOOLS[s] if s < len(SCHOOLS) else f"teaching-point-{s + 1}"
        for r in range(min(per_school, rooms - len(specs))):
            number = 101 + r
            grade = 1 + r % 6
            specs.append(RoomSpec(site, f"room-{number}", f"Room {number} (Grade {grade})"))
    # Interleave schools so a group's rooms are in different schools.
    by_school: dict[str, list[RoomSpec]] = {}
    for spec in specs:
        by_school.setdefault(spec.site, []).append(spec)
    order: list[RoomSpec] = []
    for i in range(per_school):
        order.extend(rooms_[i] for rooms_ in by_school.values() if i < len(rooms_))
    groups: list[GroupSpec] = []
    for k in range(len(order) // 4):
        chunk = order[4 * k : 4 * k + 4]
        subject = SUBJECTS[k % len(SUBJECTS)]
        groups.append(
            GroupSpec(
                group=f"g{k + 1}-{subject.lower()}",
                subject=subject,
                main=chunk[0].device,
                receiving=tuple(c.device for c in chunk[1:]),
                live=k % live_every == 0,
            )
        )
    return specs, groups


def _iso(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Active:
    id: str
    rule: str
    severity: str
    since: float
    message: str
    clear_after: int | None  # ticks left, None: until cleared by hand


@dataclass
class SimRoom:
    """One simulated room's figures and alerts (no I/O: `SimFleet` publishes them)."""

    spec: RoomSpec
    rng: random.Random
    seq: int = 1
    boot: float = field(default_factory=time.time)
    n: int = 0
    lesson: dict[str, Any] | None = None  # {"id", "role", "group", "peers": [...]}
    alerts: dict[str, _Active] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = self.rng
        self.boot -= rng.uniform(600, 8 * 3600)
        self.seq = rng.randint(1, 4)
        self.cpu_base = rng.uniform(6, 22)
        self.temp_base = rng.uniform(40, 52)
        self.disk = rng.uniform(22, 78)
        self.memory = rng.uniform(28, 55)
        self.rtt = rng.uniform(2, 35)
        self.fps = 30.0
        self.camera = "ok"
        self.clock_synced = rng.random() > 0.03
        self.frames = rng.randint(10_000, 900_000)
        # Connected some time after boot (a reconnect or two since, as seq says).
        self.connected = time.time() - rng.uniform(30, time.time() - self.boot - 5)
        self.weak_uplink = rng.random() < 0.08  # a village on a poor line: lossy streams
        # A few rooms with the troubles maintenance staff look for.
        trouble = rng.random()
        if trouble < 0.03:
            self.disk = rng.uniform(90.5, 96)
        elif trouble < 0.05:
            self.camera, self.fps = "lost", 0.0
        elif trouble < 0.07:
            self.temp_base = rng.uniform(74, 78)  # a blocked fan: 85-90 °C under load

    @property
    def device(self) -> str:
        return self.spec.device

    def state(self, status: str, reason: str | None = None) -> dict[str, Any]:
        """The state topic's payload (as `MqttLink` writes it, plus ``display_name``)."""
        payload: dict[str, Any] = {
            "status": status,
            "device": self.device,
            "site": self.spec.site,
            "room": self.spec.room,
            "display_name": self.spec.name,
            "version": VERSION,
            "profile": PROFILE,
            "boot_time": _iso(self.boot).split(".")[0] + "Z",
            "seq": self.seq,
        }
        if status == "online":
            payload["connected_at"] = _iso(self.connected)
        else:
            payload["reason"] = reason or "connection lost"
            if reason == "shutdown":
                payload["disconnected_at"] = _iso(time.time())
        return payload

    # -- alerts -------------------------------------------------------------------------

    def raise_alert(
        self,
        rule: str,
        severity: str,
        message: str,
        *,
        since: float | None = None,
        clear_after: int | None = None,
    ) -> dict[str, Any]:
        now = time.time()
        alert = _Active(str(uuid.uuid4()), rule, severity, since or now, message, clear_after)
        self.alerts[alert.id] = alert
        return self._event(alert, "raised", now)

    def clear_alert(self, alert_id: str) -> dict[str, Any] | None:
        alert = self.alerts.pop(alert_id, None)
        return None if alert is None else self._event(alert, "cleared", time.time())

    def _event(self, alert: _Active, state: str, at: float) -> dict[str, Any]:
        return {
            "v": 1,
            "id": alert.id,
            "device": self.device,
            "rule": alert.rule,
            "severity": alert.severity,
            "state": state,
            "since": round(alert.since, 3),
            "at": round(at, 3),
            "message": alert.message,
            "delayed": False,
            "details": {},
        }

    def initial_alerts(self) -> list[dict[str, Any]]:
        """Alerts the room's standing troubles have raised already."""
        since = time.time() - self.rng.uniform(120, 7200)
        events = []
        if self.disk >= 90:
            events.append(
                self.raise_alert("disk_full", "warning", f"disk {self.disk:.0f}% full", since=since)
            )
        if self.camera == "lost":
            events.append(
                self.raise_alert(
                    "camera_lost",
                    "critical",
                    "camera lost: no frames from /dev/video0",
                    since=since,
                )
            )
        if self.temp_base >= 74:
            events.append(
                self.raise_alert(
                    "temperature_high", "warning", "CPU above 85 °C for 30 s", since=since
                )
            )
        if not self.clock_synced:
            events.append(
                self.raise_alert(
                    "clock_unsynced", "warning", "clock not NTP-synchronised", since=since
                )
            )
        return events

    def tick_alerts(self, alert_rate: float) -> list[dict[str, Any]]:
        """This tick's alert events: due clears, and a new transient alert by chance."""
        events = []
        for alert in list(self.alerts.values()):
            if alert.clear_after is None:
                continue
            alert.clear_after -= 1
            if alert.clear_after <= 0:
                event = self.clear_alert(alert.id)
                if event is not None:
                    events.append(event)
        if alert_rate > 0 and self.rng.random() < alert_rate:
            rule, severity, message = self.rng.choice(
                (
                    ("camera_frozen", "critical", "camera frozen: identical frames for 10 s"),
                    ("mic_silent", "warning", "microphone silent for 60 s during a lesson"),
                    ("camera_black", "warning", "black picture for 30 s (lens covered?)"),
                )
            )
            if all(a.rule != rule for a in self.alerts.values()):
                events.append(
                    self.raise_alert(rule, severity, message, clear_after=self.rng.randint(2, 6))
                )
        return events

    # -- health -------------------------------------------------------------------------

    def health(self, interval_s: float) -> dict[str, Any]:
        """The next health message (docs/contracts.md; valid against health.v1.json)."""
        rng = self.rng
        now = time.time()
        self.n += 1
        in_lesson = self.lesson is not None
        load = 0.0
        if self.lesson is not None:
            load = 38.0 if self.lesson["role"] == "main" else 22.0
        cpu = min(100.0, max(1.0, self.cpu_base + load + rng.gauss(0, 4)))
        self.disk = min(99.0, self.disk + rng.uniform(0, 0.002))
        temperature = self.temp_base + cpu * 0.25 + rng.gauss(0, 0.8)
        frames_now = int(self.fps * interval_s)
        self.frames += frames_now
        fps = 0.0 if self.camera == "lost" else max(0.0, self.fps - abs(rng.gauss(0, 0.15)))
        level = rng.gauss(-27, 5) if in_lesson else rng.gauss(-55, 4)
        level = min(-1.0, level)
        state_for = now - self.boot
        video = {
            "state": self.camera,
            "reason": "no frames from /dev/video0" if self.camera == "lost" else "",
            "since": round(self.boot, 3),
            "state_for_s": round(state_for, 1),
            "mode": "1920x1080@30 MJPG",
            "fps": round(fps, 2),
            "frames_read": self.frames,
            "read_errors": 0,
            "reopen_attempts": 3 if self.camera == "lost" else 0,
            "mean_luma": None if self.camera == "lost" else round(rng.uniform(95, 140), 1),
            "consumers": {
                "stream": {"taken": frames_now, "skipped": 0},
                "sensing": {"taken": frames_now // 6, "skipped": frames_now - frames_now // 6},
            },
        }
        audio = {
            "state": "ok",
            "reason": "",
            "since": round(self.boot, 3),
            "state_for_s": round(state_for, 1),
            "format": "48000 Hz mono s16",
            "chunks_per_s": 50.0,
            "level_dbfs": round(level, 1),
            "peak_dbfs": round(min(0.0, level + rng.uniform(8, 16)), 1),
            "clipping": False,
        }
        return {
            "v": 1,
            "ts": round(now, 3),
            "n": self.n,
            "device": self.device,
            "system": {
                "cpu_percent": round(cpu, 1),
                "load1": round(cpu / 100 * 4, 2),
                "memory_percent": round(self.memory + rng.gauss(0, 1), 1),
                "disk_percent": round(self.disk, 1),
                "disk_free_mb": round((100 - self.disk) / 100 * 238_000, 0),
                "temperature_c": round(temperature, 1),
                "uptime_s": round(now - self.boot, 0),
                "clock_synced": self.clock_synced,
            },
            "mqtt": {
                "connected": True,
                "seq": self.seq,
                "connects": self.seq,
                "disconnects": self.seq - 1,
                "publish_rtt_ms": round(max(0.5, self.rtt + rng.gauss(0, 3)), 1),
                "ping_rtt_ms": round(max(0.5, self.rtt + rng.gauss(0, 3)), 1),
                "queued": 0,
            },
            "capture": {"video": video, "audio": audio},
            "agent": {
                "version": VERSION,
                "profile": PROFILE,
                "cpu_percent": round(cpu * 0.6, 1),
                "rss_mb": round(rng.uniform(140, 190), 1),
                "uptime_s": round(now - self.boot, 0),
                "services": {"mqtt": "running", "capture.video": "running", "health": "running"},
            },
            "alerts": {
                "active": [
                    {
                        "id": a.id,
                        "rule": a.rule,
                        "severity": a.severity,
                        "since": round(a.since, 3),
                        "message": a.message,
                    }
                    for a in self.alerts.values()
                ]
            },
            "stream": self._stream(),
            "sensing": None,
        }

    def _stream(self) -> dict[str, Any] | None:
        lesson = self.lesson
        if lesson is None:
            return None
        rng = self.rng
        peers = {}
        for peer in lesson["peers"]:
            weak = peer in lesson["weak"]
            peers[peer] = {
                "state": "connected",
                "rtt_ms": round(rng.uniform(120, 260) if weak else rng.uniform(25, 90), 1),
                "loss_percent": round(rng.uniform(1.5, 4.5) if weak else rng.uniform(0, 0.8), 2),
                "jitter_ms": round(rng.uniform(2, 12), 1),
                "bitrate_kbps": round(rng.uniform(1400, 2600), 0),
                "fps": round(rng.uniform(18, 24) if weak else rng.uniform(28, 30), 1),
                "layer": "high",
            }
        section: dict[str, Any] = {"lesson": lesson["id"], "role": lesson["role"], "peers": peers}
        if lesson["role"] == "main":
            section["group"] = lesson["group"]
        else:
            section["state"] = "live"
        return section


def announcement(group: GroupSpec, lesson_id: str, joined: Sequence[str]) -> dict[str, Any]:
    """The retained ``{prefix}/lesson/{group}`` payload (contracts v1)."""
    return {
        "v": 1,
        "lesson_id": lesson_id,
        "group": group.group,
        "subject": group.subject,
        "main": group.main,
        "expected": list(group.receiving),
        "joined": list(joined),
        "started_at": round(time.time() - 600, 3),
        "state": "live",
    }


class SimFleet:
    """Many simulated rooms over ``connections`` MQTT connections (see the module doc).

    ``run()`` connects, publishes every room's birth (retained), the live lessons'
    announcements and the alerts of standing troubles, then one health message per room
    every ``interval_s`` (phases spread evenly over the interval) until cancelled.
    ``alert_rate`` is the chance per room and tick of a transient alert.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        rooms: Sequence[RoomSpec],
        groups: Sequence[GroupSpec] = (),
        *,
        interval_s: float = 10.0,
        connections: int = 1,
        alert_rate: float = 0.0,
        offline: float = 0.0,
        silent: float = 0.0,
        seed: int = 0,
        url_override: str | None = None,
    ) -> None:
        if not rooms:
            raise ValueError("a fleet needs at least one room")
        self.prefix = broker.topic_prefix
        self.interval_s = interval_s
        self.alert_rate = alert_rate
        self.rooms = {
            spec.device: SimRoom(spec, random.Random(f"{seed}:{spec.device}")) for spec in rooms
        }
        self.groups = list(groups)
        # ``offline``/``silent``: fractions of rooms (outside live lessons) that start
        # offline (half lost, half shut down) or online but sending no health (stale).
        pick = random.Random(seed)
        busy = {d for g in self.groups if g.live for d in (g.main, *g.receiving)}
        spare = sorted(set(self.rooms) - busy)
        chosen = pick.sample(spare, min(len(spare), round((offline + silent) * len(self.rooms))))
        cut = round(offline * len(self.rooms))
        self.offline = {
            d: ("connection lost" if i % 2 else "shutdown") for i, d in enumerate(chosen[:cut])
        }
        self.silent = set(chosen[cut:])
        tag = uuid.uuid4().hex[:6]
        self.links = [
            MqttLink(
                broker,
                IdentityConfig(site="sim", room=f"carrier-{tag}-{i}"),
                software_version=VERSION,
                profile_name="sim",
                url_override=url_override,
                announce=False,
            )
            for i in range(max(1, min(connections, len(self.rooms))))
        ]
        self._carrier = {
            device: self.links[i % len(self.links)] for i, device in enumerate(self.rooms)
        }
        self._ready = asyncio.Event()
        self.health_sent = 0
        self.alerts_sent = 0

    def topic(self, device: str, kind: str) -> str:
        site, room = device.split(".", 1)
        return f"{self.prefix}/{site}/{room}/{kind}"

    async def wait_ready(self) -> None:
        """Until every birth, announcement and standing alert is published."""
        await self._ready.wait()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for i, link in enumerate(self.links):
                tasks.create_task(link.run(), name=f"sim-link-{i}")
            for link in self.links:
                await link.wait_connected()
            for room in self.rooms.values():
                reason = self.offline.get(room.device)
                state = room.state("online") if reason is None else room.state("offline", reason)
                await self._publish(room.device, "state", state, 1, True)
            for group in self.groups:
                await self._start_lesson(group)
            for room in self.rooms.values():
                for event in room.initial_alerts():
                    await self._publish(room.device, "alert", event, 1, False)
            self._ready.set()
            tasks.create_task(self._health_loop(), name="sim-health")

    async def _publish(
        self, device: str, kind: str, payload: dict[str, Any], qos: int, retain: bool
    ) -> None:
        await self._carrier[device].publish(
            self.topic(device, kind), payload, qos=qos, retain=retain
        )

    async def _start_lesson(self, group: GroupSpec) -> None:
        if not group.live or group.main not in self.rooms:
            return
        lesson_id = uuid.uuid4().hex[:16]
        receiving = [d for d in group.receiving if d in self.rooms]
        late = random.Random(group.group).random() < 0.3  # one room has not joined yet
        joined = receiving[:-1] if late and len(receiving) > 1 else receiving
        weak = {d for d in joined if self.rooms[d].weak_uplink}
        self.rooms[group.main].lesson = {
            "id": lesson_id,
            "role": "main",
            "group": group.group,
            "peers": joined,
            "weak": weak,
        }
        for device in joined:
            self.rooms[device].lesson = {
                "id": lesson_id,
                "role": "receiving",
                "group": group.group,
                "peers": [group.main],
                "weak": {group.main} if device in weak else set(),
            }
        payload = announcement(group, lesson_id, joined)
        await self._carrier[group.main].publish(
            f"{self.prefix}/lesson/{group.group}", payload, qos=1, retain=True
        )

    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        order = [r for d, r in self.rooms.items() if d not in self.offline and d not in self.silent]
        if not order:
            return
        step = self.interval_s / len(order)
        start = loop.time()
        tick = 0
        while True:
            for i, room in enumerate(order):
                delay = start + tick * self.interval_s + i * step - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.publish_health(room.device)
            tick += 1

    async def publish_health(self, device: str) -> dict[str, Any]:
        """One health message for ``device`` now (after its due alert events)."""
        room = self.rooms[device]
        for event in room.tick_alerts(self.alert_rate):
            await self._send_alert(device, event)
        message = room.health(self.interval_s)
        await self._publish(device, "health", message, 0, False)
        self.health_sent += 1
        return message

    async def raise_alert(
        self, device: str, rule: str, severity: str = "critical", message: str = ""
    ) -> dict[str, Any]:
        """Raise an alert in ``device`` now; returns the event published."""
        event = self.rooms[device].raise_alert(rule, severity, message or rule.replace("_", " "))
        await self._send_alert(device, event)
        return event

    async def clear_alert(self, device: str, alert_id: str) -> dict[str, Any] | None:
        event = self.rooms[device].clear_alert(alert_id)
        if event is not None:
            await self._send_alert(device, event)
        return event

    async def _send_alert(self, device: str, event: dict[str, Any]) -> None:
        try:
            await self._publish(device, "alert", event, 1, False)
            self.alerts_sent += 1
        except LinkError as exc:
            logger.warning("simulated alert of %s not sent: %s", device, exc)

    async def set_offline(self, device: str, reason: str = "connection lost") -> dict[str, Any]:
        """Publish what the room's Last Will (or its clean stop) would; returns it."""
        room = self.rooms[device]
        state = room.state("offline", reason)
        await self._publish(device, "state", state, 1, True)
        return state

    async def set_online(self, device: str) -> dict[str, Any]:
        """The room reconnects: a birth with the next ``seq``; returns it."""
        room = self.rooms[device]
        room.seq += 1
        room.connected = time.time()
        state = room.state("online")
        await self._publish(device, "state", state, 1, True)
        return state


# -- one room in its own process ------------------------------------------------------------


async def run_room(
    broker: BrokerConfig, identity: IdentityConfig, interval_s: float, ready: asyncio.Event
) -> None:
    """One simulated room over its own `MqttLink`: real birth, Last Will and shutdown."""
    link = MqttLink(broker, identity, software_version=VERSION, profile_name=PROFILE)
    spec = RoomSpec(identity.site, identity.room, identity.display_name or identity.device_id)
    room = SimRoom(spec, random.Random(identity.device_id))
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(link.run(), name="sim-room-link")
        await link.wait_connected()
        room.seq = link.seq
        ready.set()
        while True:
            with contextlib.suppress(LinkError):
                await link.publish(link.topics.health, room.health(interval_s), qos=0)
            await asyncio.sleep(interval_s)


async def _room_main(args: argparse.Namespace) -> int:
    site, room = args.room.split(".", 1)
    broker = BrokerConfig(
        url=args.broker,
        topic_prefix=args.prefix,
        keepalive_s=5,
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
    )
    identity = IdentityConfig(site=site, room=room, display_name=args.name)
    ready = asyncio.Event()
    task = asyncio.create_task(run_room(broker, identity, args.interval, ready), name="sim-room")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    waiter = asyncio.create_task(ready.wait(), name="sim-room-ready")
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        sys.stdout.write(f"ready {identity.device_id}\n")
        sys.stdout.flush()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one simulated classroom on its own connection")
    parser.add_argument("--broker", required=True, help="mqtt://host:port")
    parser.add_argument("--prefix", default="edu", help="topic prefix")
    parser.add_argument("--room", required=True, help="device id, site.room")
    parser.add_argument("--name", help="display name")
    parser.add_argument("--interval", type=float, default=10.0, help="health interval, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_room_main(args))

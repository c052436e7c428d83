"""``classroom-agent demo``: a small fleet on an embedded broker, watched live.

Starts Mosquitto on a loopback port, writes a site file per room (one main classroom
and its receiving classrooms, all on the ``virtual`` hardware profile), runs each
agent as its own ``classroom-agent run`` process, and renders what the fleet publishes:
retained state (birth/Last Will) and health telemetry. Once every room is online it
presses the main room's one button (the panel's own HTTP API, as the touch screen
does) and reports when each receiving room went live, read from the panel's status.
On Ctrl-C (or after ``--duration``) it ends the lesson, stops every agent with SIGTERM
and reports how long each took.

The first receiving room senses its class: its camera is a video of real faces (an
enrolled roster, one student absent, one visitor, and a man standing at the side who
raises his hands for 3 s every 12 s) and, where Debian's ``espeak-ng`` is installed, the
lesson is spoken: the main room's microphone is a teacher's voice, the sensing room's its
pupils answering, on a known script (`LESSON_SCRIPT`). The sensing
room hears its remote teacher through its loudspeaker (a WAV file output, whose reference
the talk analysis reads), so its S-T figures are the dual-teacher lesson's. When the
lesson ends the demo prints the room's figures and writes its lesson report with
``classroom-agent report LESSON --html FILE`` (in the rooms' ``ui.language``, Chinese
unless ``--language`` says otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from agent.broker import LocalCredentials, locked_broker
from agent.config import BrokerConfig, IdentityConfig, UiLanguage
from agent.contracts import ContractError, DeviceState, FleetTopics
from agent.dashboard import DashboardConfig, DashboardServer
from agent.panel import PanelClient, PanelUnavailable
from agent.sync import Message, MqttLink, generate_key
from agent.testkit import (
    DemoClass,
    espeak_available,
    lesson_audio,
    lesson_voices,
    make_demo_class,
    photos_dir,
)

GROUP = "g5-english"
ROOMS = [
    ("central-school", "room-101", "Central School, Room 101", "main"),
    ("village-a", "room-1", "Village A teaching point", "receiving"),
    ("village-b", "room-1", "Village B teaching point", "receiving"),
    ("village-c", "room-1", "Village C teaching point", "receiving"),
    ("village-d", "room-1", "Village D teaching point", "receiving"),
    ("village-e", "room-1", "Village E teaching point", "receiving"),
    ("village-f", "room-1", "Village F teaching point", "receiving"),
    ("village-g", "room-1", "Village G teaching point", "receiving"),
]
MAX_ROOMS = len(ROOMS)
PANEL_PORT = 8470  # the main room's panel; receiving rooms' kiosks follow
PREFIX: str = BrokerConfig.model_fields["topic_prefix"].get_default()
FLEET = FleetTopics(PREFIX)
# Read-only users of the demo broker: the demo's own monitor and the dashboard it serves;
# and IT, the admin that pushes config profiles.
MONITOR, DASHBOARD, IT_USER = "monitor", "dashboard", "it"
# The spoken lesson: per S-T interval 'T' the (remote) teacher talks, 'S' the pupils answer;
# teacher and class take turns every two intervals, a dialogue (Rt 0.5, Ch 0.5) by the
# standard's thresholds. One interval is 3 s instead of the standard's 30 s, so that a
# demo of a minute has a curve; the WAV files loop (36 s).
LESSON_SCRIPT = "TTSS" * 3
LESSON_MODE = "dialogue"
ST_INTERVAL_S = 3.0
LESSON_RATE = 48_000
# The sensing room's settings (sensing is off by default), quick to settle for a short
# demo; bench/sensing.py's "demo" section measures them on the demo's class.
DEMO_SENSING: dict[str, Any] = {
    "enabled": True,
    "sample_fps": 4,
    "embed_every_s": 0.5,
    "st_interval_s": ST_INTERVAL_S,
}
DEMO_PROFILES = {
    # A newcomer's first push, and one that breaks the broker settings (rolled back).
    "health.yaml": "# Health telemetry every 5 s instead of every second.\n"
    "health:\n  interval_s: 5\n",
    "broken-broker.yaml": "# A broker nobody runs: every room loses it, then rolls back.\n"
    "broker:\n  url: mqtt://127.0.0.1:9\n",
}


def it_keys(workdir: Path) -> list[Path]:
    """IT's two signing keys for the demo (kept from an earlier run in the same workdir);
    every demo room pins their public halves."""
    directory = workdir / "it-keys"
    keys = sorted(directory.glob("*.key")) if directory.exists() else []
    while len(keys) < 2:
        generate_key(directory)
        keys = sorted(directory.glob("*.key"))
    return keys[:2]


def pinned(keys: list[Path]) -> list[str]:
    return [key.with_suffix(".pub").read_text().strip() for key in keys]


@dataclass
class RoomView:
    device: str
    role: str
    state: dict[str, Any] = field(default_factory=dict)
    current: DeviceState | None = None  # the state message in force (contracts' order)
    health: dict[str, Any] = field(default_factory=dict)
    health_at: float = 0.0
    live_at: float | None = None  # when the main room's panel first showed this room live
    panel_port: int = 0
    g2g_ms: float | None = None  # last glass-to-glass median reported while live
    attendance: dict[str, Any] | None = None  # the sensing room's counts at the lesson end
    st: dict[str, Any] | None = None  # its S-T figures at the lesson end
    site_file: Path | None = None
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    stop_s: float | None = None


def room_identity(room: tuple[str, str, str, str], receivers: list[str]) -> dict[str, Any]:
    """The ``identity`` section of one demo room (its site file, and the broker's ACL)."""
    site, name, display, role = room
    membership: dict[str, Any] = {"group": GROUP, "role": role}
    if role == "main":
        membership["receivers"] = receivers
    return {"site": site, "room": name, "display_name": display, "groups": [membership]}


def site_file(
    workdir: Path,
    room: tuple[str, str, str, str],
    broker_url: str,
    receivers: list[str],
    panel_port: int,
    *,
    password_file: Path,
    trusted_keys: list[str] | None = None,
    sensing: DemoClass | None = None,
    microphone: Path | None = None,
    language: UiLanguage = "zh-CN",
) -> Path:
    """One room's site file. ``microphone``: a WAV file the room's microphone plays (the
    spoken lesson), else the profile's synthetic tone."""
    site, name, _, _ = room
    config = {
        "identity": room_identity(room, receivers),
        "hardware": {"profile": "virtual"},
        # Its own password on the demo's broker, which has the fleet's ACL: a room can
        # speak only as itself, as in a school.
        "broker": {"url": broker_url, "keepalive_s": 5, "password_file": str(password_file)},
        "capture": {"video": {"width": 640, "height": 360, "fps": 25}},
        "health": {"interval_s": 1},
        # Everything stays on this machine: loopback ICE candidates, no STUN server.
        "stream": {
            "ice_host_addresses": ["127.0.0.1"],
            "video_bitrate_kbps": 800,
            "panel_port": panel_port,
        },
        "supervisor": {"state_dir": str(workdir / "state" / f"{site}.{name}")},
        "ui": {"language": language},
    }
    if trusted_keys:
        config["profiles"] = {"trusted_keys": trusted_keys}
    if sensing is not None:
        # The sensing room: its camera is a video of a class of real faces, and sensing
        # is on (off by default everywhere else), quick to settle for a short demo.
        width, height = sensing.size
        config["capture"] = {
            "video": {
                "source": "file",
                "path": str(sensing.video),
                "width": width,
                "height": height,
                "fps": 25,
            }
        }
        config["sensing"] = dict(DEMO_SENSING)
        # Its loudspeaker is a file: what it plays (the remote teacher) is the reference
        # the talk analysis counts as T (at most stream.playback.file_max_s of it).
        state = workdir / "state" / f"{site}.{name}"
        config["stream"]["playback"] = {"output": "file", "path": str(state / "loudspeaker.wav")}
    if microphone is not None:
        config["capture"]["audio"] = {
            "source": "file",
            "path": str(microphone),
            "sample_rate": LESSON_RATE,
            "channels": 1,
        }
    path = workdir / f"{site}.{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _video(view: RoomView) -> dict[str, Any]:
    capture = view.health.get("capture") or {}
    video: dict[str, Any] = capture.get("video") or {}
    return video


def render(views: list[RoomView], broker_url: str, started: float) -> str:
    lines = [
        f"Classroom Edge Agent demo - broker {broker_url} - group {GROUP} - "
        f"{time.monotonic() - started:.0f} s",
        "",
        f"{'ROOM':<26} {'ROLE':<10} {'STATE':<8} {'SEQ':>3}  {'CAMERA':<9} {'FPS':>5} "
        f"{'FRAMES':>7}  {'MIC dBFS':>8}  {'CPU%':>5}  {'LESSON':<14} {'G2G ms':>6} "
        f"{'HEADS':>5}",
    ]
    for view in views:
        status = view.state.get("status", "-")
        video = _video(view)
        audio = (view.health.get("capture") or {}).get("audio") or {}
        agent = view.health.get("agent") or {}
        level = audio.get("level_dbfs")
        lines.append(
            f"{view.device:<26} {view.role:<10} {status:<8} {view.state.get('seq', '-')!s:>3}  "
            f"{video.get('state', '-')!s:<9} {_num(video.get('fps')):>5} "
            f"{video.get('frames_read', '-')!s:>7}  {_num(level):>8}  "
            f"{_num(agent.get('cpu_percent')):>5}  {lesson_state(view):<14} "
            f"{_num(view.g2g_ms):>6} {head_count(view):>5}"
        )
    return "\n".join(lines)


def head_count(view: RoomView) -> str:
    """Faces the room's sensing sees now ('-' where sensing is off, as by default)."""
    sensing = view.health.get("sensing")
    if not isinstance(sensing, dict):
        return "-"
    if sensing.get("state") != "running":
        return str(sensing.get("state", "-"))
    return str(sensing.get("head_count", "-"))


def lesson_state(view: RoomView) -> str:
    """'waiting', 'joining', 'live', … for a receiving room; 'live 2/2' for the main room."""
    stream = view.health.get("stream")
    if not isinstance(stream, dict):
        return "waiting" if view.role == "receiving" else "-"
    peers = stream.get("peers") or {}
    if stream.get("role") == "main":
        live = sum(1 for peer in peers.values() if (peer or {}).get("state") == "connected")
        return f"live {live}/{len(peers)}"
    return str(stream.get("state", "-"))


def glass_to_glass_ms(view: RoomView) -> float | None:
    """Median capture-to-decoded latency of the video this room receives (stamped frames)."""
    stream = view.health.get("stream")
    received = stream.get("received") if isinstance(stream, dict) else None
    for figures in (received or {}).values():
        value = figures.get("latency_p50_ms")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _num(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


class Demo:
    def __init__(  # noqa: PLR0917 (the command's options, in its order)
        self,
        rooms: int,
        duration_s: float,
        workdir: Path,
        out: TextIO,
        dashboard_port: int = 0,
        language: UiLanguage = "zh-CN",
    ) -> None:
        self.rooms = ROOMS[:rooms]
        self.language: UiLanguage = language
        self.duration_s = duration_s
        self.workdir = workdir
        self.keys = it_keys(workdir)
        self.out = out
        self.views = {
            f"{site}.{room}": RoomView(f"{site}.{room}", role) for site, room, _, role in self.rooms
        }
        self._stop = asyncio.Event()
        self.button_at: float | None = None
        self.dashboard_port = dashboard_port
        self.dashboard_url = ""
        self.main = next(f"{s}.{r}" for s, r, _, role in self.rooms if role == "main")
        self.receivers = [f"{site}.{name}" for site, name, _, role in self.rooms if role != "main"]
        self.credentials: LocalCredentials  # made with the broker, in run()
        self._tasks: set[asyncio.Task[None]] = set()
        self.panels_text = ""
        # The first receiving room senses its class (a video of real faces).
        self.sensing_room = self.receivers[0] if self.receivers else None
        self.sensing_class: DemoClass | None = None
        self.microphones: dict[str, Path] = {}  # device -> the WAV its microphone plays
        self._attendance = asyncio.Event()

    def _print_panels(self) -> None:
        lines = []
        for view in self.views.values():
            what = "teacher panel" if view.role == "main" else "kiosk"
            lines.append(f"{what} of {view.device}: http://127.0.0.1:{view.panel_port}/")
        token_file = self.workdir / "state" / self.main / "panel-token"
        with contextlib.suppress(OSError):
            token = token_file.read_text(encoding="utf-8").strip()
            lines.append(
                f"watch page of {self.main}: "
                f"http://127.0.0.1:{self.views[self.main].panel_port}/watch#token={token}"
            )
        self.panels_text = "\n".join(lines)
        self.out.write(self.panels_text + "\n")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop.set)
        locked, self.credentials = locked_broker(
            [
                IdentityConfig.model_validate(room_identity(room, self.receivers))
                for room in self.rooms
            ],
            self.workdir / "broker",
            prefix=PREFIX,
            readers=[MONITOR, DASHBOARD],
            admins=[IT_USER],
        )
        async with locked as broker:
            self.out.write(
                f"embedded Mosquitto at {broker.url} (a password per room and the fleet's ACL, "
                f"in {self.workdir / 'broker'}); files in {self.workdir}\n"
            )
            monitor = MqttLink(
                self.credentials.broker_config(MONITOR, broker.url, topic_prefix=PREFIX),
                IdentityConfig(site="demo", room="monitor"),
                software_version="demo",
                profile_name="-",
                announce=False,
            )
            dashboard = DashboardServer(
                DashboardConfig(
                    broker=self.credentials.broker_config(
                        DASHBOARD, broker.url, topic_prefix=PREFIX
                    ),
                    port=self.dashboard_port,
                    health_interval_s=1,
                )
            )
            async with asyncio.TaskGroup() as group:
                link_task = group.create_task(monitor.run(), name="demo-monitor-link")
                watch_task = group.create_task(self._watch(monitor), name="demo-watch")
                dashboard_task = group.create_task(dashboard.run(), name="demo-dashboard")
                try:
                    await dashboard.wait_ready()
                    self.dashboard_url = dashboard.url
                    self.out.write(
                        f"maintenance dashboard: {dashboard.url} (open it in a browser)\n"
                    )
                    await self._start_agents(broker.url)
                    self._print_profiles(broker.url)
                    pids = ", ".join(
                        f"{view.device} pid {view.process.pid}"
                        for view in self.views.values()
                        if view.process is not None
                    )
                    self.out.write(f"agents: {pids} (kill -9 one to see it go offline)\n")
                    ok = await self._show(broker.url)
                finally:
                    await self._stop_agents()
                    watch_task.cancel()
                    link_task.cancel()
                    dashboard_task.cancel()
        self._report()
        all_clean = all(view.exit_code == 0 for view in self.views.values())
        return 0 if ok and all_clean else 1

    def _print_profiles(self, broker_url: str) -> None:
        """How IT pushes a signed profile to the demo's rooms (README: config profiles)."""
        folder = self.workdir / "profiles"
        folder.mkdir(exist_ok=True)
        for name, text in DEMO_PROFILES.items():
            (folder / name).write_text(text)
        key = self.keys[0]
        broker = (
            f"--broker {broker_url} --username {IT_USER} "
            f"--password-file {self.credentials.password_file(IT_USER)}"
        )
        scope = f"group:{GROUP}"
        self.out.write(
            "config profiles: IT's keys in "
            f"{key.parent} (every room pins them); try, with .venv/bin/classroom-agent:\n"
            f"  profile sign {folder / 'health.yaml'} --key {key} --scope {scope} "
            f"--version 1 --out {folder / 'health.json'}\n"
            f"  profile push {folder / 'health.json'} {broker}\n"
            f"  profile status --scope {scope} {broker}\n"
        )

    async def _start_agents(self, broker_url: str) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        self.microphones = await asyncio.to_thread(self._spoken_lesson)
        for index, room in enumerate(self.rooms):
            view = self.views[f"{room[0]}.{room[1]}"]
            view.panel_port = free_port(PANEL_PORT + index, taken)
            taken.add(view.panel_port)
            sensing = await asyncio.to_thread(self._sensing_class, view.device)
            path = site_file(
                self.workdir,
                room,
                broker_url,
                self.receivers,
                view.panel_port,
                password_file=self.credentials.password_file(view.device),
                trusted_keys=pinned(self.keys),
                sensing=sensing,
                microphone=self.microphones.get(view.device),
                language=self.language,
            )
            view.site_file = path
            log_file = (logs / f"{view.device}.log").open("wb")
            view.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "-c",
                str(path),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
            log_file.close()

    def _sensing_class(self, device: str) -> DemoClass | None:
        """The sensing room's class: its camera video, with its roster enrolled (None
        elsewhere)."""
        if device != self.sensing_room:
            return None
        photos = photos_dir()
        if photos is None:
            self.out.write("sensing room: no face photos here (run from a checkout); off\n")
            return None
        store = self.workdir / "state" / device / "sensing"
        self.sensing_class = make_demo_class(photos, self.workdir, store)
        truth = self.sensing_class
        self.out.write(
            f"sensing room {device}: {truth.enrolled} students enrolled (encrypted in "
            f"{store}), {truth.in_room} of them and {truth.strangers} people not enrolled in "
            f"the video {truth.video}, one of whom raises his hands for "
            f"{truth.hands_up_s[1] - truth.hands_up_s[0]:g} s every {truth.loop_s:g} s\n"
        )
        return truth

    def _spoken_lesson(self) -> dict[str, Path]:
        """The lesson's sound (`LESSON_SCRIPT`, espeak-ng voices): the teacher's part for
        the main room's microphone, the pupils' for the sensing room's. Empty where there
        is no sensing room or no espeak-ng (the profile's tone plays instead)."""
        if self.sensing_room is None:
            return {}
        if not espeak_available():
            self.out.write("no espeak-ng here: the lesson is not spoken, no S-T figures\n")
            return {}
        from agent.sensing import write_wav  # noqa: PLC0415  (loaded for the sensing room only)

        voices = lesson_voices(LESSON_RATE, pupils=2)
        parts = {
            self.main: LESSON_SCRIPT.replace("S", "."),  # the teacher, at the front
            self.sensing_room: LESSON_SCRIPT.replace("T", "."),  # the class answering
        }
        files = {}
        for device, script in parts.items():
            mic, _ = lesson_audio(
                script, voices, rate=LESSON_RATE, interval_s=ST_INTERVAL_S, talk_s=2.2
            )
            path = self.workdir / f"lesson-{device}.wav"
            write_wav(path, mic, LESSON_RATE)
            files[device] = path
        self.out.write(
            f"spoken lesson (espeak-ng): the teacher in {files[self.main].name}, the pupils "
            f"in {files[self.sensing_room].name}; script {LESSON_SCRIPT} (T teacher, S "
            f"class, every {ST_INTERVAL_S:.0f} s): a {LESSON_MODE} lesson\n"
        )
        return files

    async def _watch(self, monitor: MqttLink) -> None:
        await monitor.wait_connected()
        async with (
            monitor.subscribe(FLEET.state_all) as states,
            monitor.subscribe(FLEET.health_all, qos=0) as health,
            monitor.subscribe(FLEET.sensing_all) as sensing,
        ):
            await asyncio.gather(
                self._consume(states, "state"),
                self._consume(health, "health"),
                self._consume(sensing, "sensing"),
            )

    async def _consume(self, messages: Any, kind: str) -> None:
        async for message in messages:
            self._apply(message, kind)

    def _apply(self, message: Message, kind: str) -> None:
        _, site, room, _ = message.topic.split("/", 3)
        view = self.views.get(f"{site}.{room}")
        if view is None:
            return
        try:
            data = json.loads(message.payload)
        except ValueError:
            return
        if kind == "sensing":
            if isinstance(data, dict) and data.get("kind") == "st":
                view.st = data
            if isinstance(data, dict) and data.get("kind") == "attendance":
                view.attendance = data
                self._attendance.set()
            return
        if kind == "state":
            if not isinstance(data, dict):
                return
            try:
                state = DeviceState.parse(data)
            except ContractError:
                return
            if state.newer_than(view.current):
                view.current = state
                view.state = data
        else:
            view.health = data
            view.health_at = time.monotonic()
            view.g2g_ms = glass_to_glass_ms(view) or view.g2g_ms

    def panel(self, device: str) -> PanelClient:
        return PanelClient(f"http://127.0.0.1:{self.views[device].panel_port}/")

    async def _press(self, action: str) -> bool:
        """The teacher's one button: the main room's panel API, as its touch screen uses."""
        client = self.panel(self.main)
        try:
            if action == "start":
                result = await asyncio.to_thread(client.start, None, "English")
            else:
                result = await asyncio.to_thread(client.end)
        except PanelUnavailable as exc:
            self.out.write(f"{exc}\n")
            return False
        if not result.get("ok"):
            self.out.write(f"the panel refused {action}: {result.get('error')}\n")
            return False
        return True

    async def _follow_join(self) -> None:
        """Poll the main room's panel until every receiving room is live (or 30 s)."""
        client = self.panel(self.main)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(PanelUnavailable):
                status = await asyncio.to_thread(client.status)
                for host in status.get("hosting", []):
                    for device, info in (host.get("rooms") or {}).items():
                        view = self.views.get(device)
                        if view is not None and view.live_at is None and info["state"] == "live":
                            view.live_at = time.monotonic()
            if all(v.live_at is not None for v in self.views.values() if v.role == "receiving"):
                return
            await asyncio.sleep(0.05)

    def _everyone_online(self) -> bool:
        return all(
            view.state.get("status") == "online" and _video(view).get("state") == "ok"
            for view in self.views.values()
        )

    async def _end_lesson(self) -> bool:
        """Press End; the receiving rooms must go back to waiting."""
        receiving = [v for v in self.views.values() if v.role == "receiving"]
        if self.button_at is None or not receiving:
            return True
        if not await self._press("end"):
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(lesson_state(view) == "waiting" for view in receiving):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _show(self, broker_url: str) -> bool:
        started = time.monotonic()
        interactive = self.out.isatty()
        deadline = started + self.duration_s if self.duration_s > 0 else None
        last_print = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            for view in self.views.values():
                if view.process is not None and view.process.returncode is not None:
                    view.exit_code = view.process.returncode
            if self.button_at is None and self._everyone_online():
                self.button_at = time.monotonic()
                if await self._press("start"):
                    follow = asyncio.create_task(self._follow_join(), name="demo-follow-join")
                    self._tasks.add(follow)
                    follow.add_done_callback(self._tasks.discard)
                    self._print_panels()
            if interactive:
                self.out.write(
                    "\x1b[H\x1b[2J" + render(list(self.views.values()), broker_url, started)
                )
                self.out.write(
                    f"\n\nMaintenance dashboard: {self.dashboard_url}\n{self.panels_text}\n"
                    "Ctrl-C stops the demo.\n"
                )
                self.out.flush()
            elif now - last_print >= 5:
                self.out.write(render(list(self.views.values()), broker_url, started) + "\n\n")
                self.out.flush()
                last_print = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=1.0)
        self.out.write(render(list(self.views.values()), broker_url, started) + "\n\n")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        everyone_joined = all(
            view.live_at is not None for view in self.views.values() if view.role == "receiving"
        )
        healthy = self._everyone_online()
        ended = await self._end_lesson()
        self.out.write(
            "lesson ended: receiving rooms back to 'waiting'\n"
            if ended
            else "lesson end: a room did not go back to 'waiting' within 10 s\n"
        )
        await self._report_sensing()
        return healthy and everyone_joined and ended

    async def _report_sensing(self) -> None:
        """The sensing room's figures, as published at the lesson's end, and its report."""
        if self.sensing_room is None or self.sensing_class is None or self.button_at is None:
            return
        view = self.views[self.sensing_room]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attendance.wait(), timeout=10)
        counts = view.attendance
        if counts is None:
            self.out.write(f"{view.device}: no attendance published within 10 s\n")
            return
        truth = self.sensing_class
        self.out.write(
            f"{view.device} attendance: present {counts['present']}, late {counts['late']}, "
            f"left early {counts['left_early']}, absent {counts['absent']} of "
            f"{counts['enrolled']} enrolled; {counts['unknown']} unknown face(s) "
            f"(in the video: {truth.in_room} enrolled students, {truth.strangers} not "
            "enrolled)\n"
        )
        rate = counts.get("head_up_rate")
        hands = counts.get("hand_raises")
        st = view.st
        figures = [
            f"head-up rate {'-' if rate is None else f'{100 * rate:.0f}%'}",
            f"hand raises {'-' if hands is None else hands} (the video's: "
            f"{truth.raises_per_loop} every {truth.loop_s:g} s)",
        ]
        if st is not None:
            figures.append(
                f"S-T {st['samples']}: Rt {st['rt']:.2f}, Ch {st['ch']:.2f}, {st['mode']} "
                f"(the script's: {LESSON_MODE})"
            )
        self.out.write(f"{view.device} lesson figures: {', '.join(figures)}\n")
        lesson = counts.get("lesson")
        if isinstance(lesson, str) and view.site_file is not None:
            await self._write_report(view.site_file, view.device, lesson)

    async def _write_report(self, site_file: Path, device: str, lesson: str) -> None:
        """The lesson report as the room's staff get it: ``classroom-agent report LESSON
        --html FILE`` with the room's own site file (its store, its ui.language)."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"report-{device}-{lesson}.html")
        path = self.workdir / name
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "report",
            lesson,
            "--html",
            str(path),
            "-c",
            str(site_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()
            output = b"no answer within 60 s"
        if process.returncode == 0:
            self.out.write(f"{device} lesson report ({self.language}): {path}\n")
        else:
            self.out.write(f"{device} lesson report not written: {output.decode().strip()}\n")

    async def _stop_agents(self) -> None:
        async def stop(view: RoomView) -> None:
            process = view.process
            if process is None:
                return
            if process.returncode is None:
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                view.stop_s = time.monotonic() - started
            view.exit_code = process.returncode

        await asyncio.gather(*(stop(view) for view in self.views.values()))

    def _report(self) -> None:
        for view in self.views.values():
            if view.role != "receiving":
                continue
            if self.button_at is None or view.live_at is None:
                self.out.write(f"{view.device}: never joined the lesson\n")
                continue
            took = view.live_at - self.button_at
            g2g = view.g2g_ms
            latency = f", glass-to-glass median {g2g:.0f} ms" if g2g is not None else ""
            self.out.write(f"{view.device}: live {took:.2f} s after the button{latency}\n")
        for view in self.views.values():
            stop = f"stopped in {view.stop_s:.2f} s" if view.stop_s is not None else "had exited"
            self.out.write(f"{view.device}: {stop}, exit code {view.exit_code}\n")
        self.out.write(f"logs: {self.workdir / 'logs'}\n")


def free_port(preferred: int, taken: set[int]) -> int:
    """``preferred`` if free, else the next free port above it (panels need known ports)."""
    for port in range(preferred, preferred + 200):
        if port not in taken and _free_or_any(port) == port:
            return port
    raise RuntimeError(f"no free port in {preferred}-{preferred + 199} for the demo's panels")


def _free_or_any(port: int) -> int:
    """``port`` if nothing listens on it, else 0 (any free port): the demo must start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def run_demo(
    rooms: int = 3,
    duration_s: float = 0,
    workdir: Path | None = None,
    dashboard_port: int = 8480,
    language: UiLanguage = "zh-CN",
) -> int:
    if not 1 <= rooms <= MAX_ROOMS:
        sys.stderr.write(f"--rooms: must be between 1 and {MAX_ROOMS}, got {rooms}\n")
        return 2
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="classroom-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(rooms, duration_s, workdir, sys.stdout, _free_or_any(dashboard_port), language)
    return asyncio.run(demo.run())

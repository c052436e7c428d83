"""Whole classrooms in one test process: link + synthetic hubs + stream service (+ panel).

Each room is what the daemon runs for the live lesson: its own MqttLink on a real
Mosquitto, a synthetic camera and microphone (320x240@15, stamped frames), a
`StreamService`, and, where asked, the `PanelServer` on a free loopback port. Received
media goes to a `ProbeSink` (stamps: frame numbers, glass-to-glass) and a
`LatestFrames` board (what the panel's tiles and kiosk show).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config.models import (
    AudioConfig,
    CaptureConfig,
    GroupMembership,
    IdentityConfig,
    LessonRole,
    StreamConfig,
    UiConfig,
    VideoConfig,
)
from agent.panel import PanelServer
from agent.sensing import LessonReports
from agent.stream import EncoderSettings, JoinState, ProbeSink, StreamService
from agent.stream.playback import AudioPlayback
from agent.stream.sinks import FanOutSink, FrameObserver, LatestFrames
from agent.sync import MqttLink
from tests.brokers import BrokerUnderTest, eventually, running

GROUP = "music"
MAIN = "school1.room1"
ROOM2 = "school1.room2"
ROOM3 = "school2.room3"
OUTSIDER = "school9.room9"
SMALL = CaptureConfig(
    video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
)
PANEL_TOKEN = "test-token-0123456789abcdef"


@dataclass
class Room:
    device: str
    link: MqttLink
    video: FrameHub
    audio: AudioHub
    service: StreamService
    probe: ProbeSink
    board: LatestFrames
    panel: PanelServer | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    link_task: asyncio.Task[None] | None = None  # cancel it to drop the room off the broker

    @property
    def host(self) -> Any:
        return self.service.hosts[GROUP]

    @property
    def joiner(self) -> Any:
        assert self.service.joiner is not None
        return self.service.joiner


def identity(device: str, role: LessonRole, receivers: tuple[str, ...] = (ROOM2, ROOM3)) -> Any:
    site, name = device.split(".")
    members = list(receivers) if role is LessonRole.MAIN else []
    membership = GroupMembership(group=GROUP, role=role, receivers=members)
    return IdentityConfig(
        site=site, room=name, display_name=display_name(device), groups=[membership]
    )


def display_name(device: str) -> str:
    site, name = device.split(".")
    return f"{site.title()} {name.title()}"


@contextlib.asynccontextmanager
async def room(
    broker: BrokerUnderTest,
    device: str,
    *,
    main: bool = False,
    panel: bool = False,
    keyframe_interval_s: float = 2.0,
    hubs: tuple[FrameHub, AudioHub] | None = None,
    receivers: tuple[str, ...] = (ROOM2, ROOM3),
    playback: AudioPlayback | None = None,
    observers: Sequence[FrameObserver] = (),
    panel_bind: str = "127.0.0.1",
    reports: LessonReports | None = None,
    corrected: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ui: UiConfig | None = None,
) -> AsyncIterator[Room]:
    """One classroom's agent (link + hubs + stream service [+ panel]), stopped on exit.

    ``playback``: its loudspeakers (the stream service runs it and wires it to the
    microphone's echo canceller, as in the daemon); ``observers``: more consumers of
    the media it receives; ``panel_bind``, ``reports``, ``corrected`` and ``ui``: the
    panel's address, lesson reports, hook for a corrected report and language."""
    role = LessonRole.MAIN if main else LessonRole.RECEIVING
    link = MqttLink(
        broker.broker_config(None),
        identity(device, role, receivers),
        software_version="0.0.0-test",
        profile_name="virtual",
    )
    own_hubs = hubs is None
    video, audio = hubs or (
        FrameHub(open_video_source(SMALL.video), SMALL),
        AudioHub(open_audio_source(SMALL.audio), SMALL),
    )
    probe = ProbeSink()
    board = LatestFrames()
    config = StreamConfig(video_bitrate_kbps=400, panel_port=0, panel_bind=panel_bind)
    service = StreamService(
        link,
        video,
        audio,
        config,
        host_addresses=["127.0.0.1"],
        sink=FanOutSink([probe, board, *observers, *([playback] if playback else [])]),
        encoder_settings=EncoderSettings(bitrate_kbps=400, keyframe_interval_s=keyframe_interval_s),
        playback=playback,
    )
    server = None
    if panel:
        server = PanelServer(
            service,
            config,
            link.identity,
            token=PANEL_TOKEN,
            board=board,
            audio=audio,
            ui=ui,
            reports=reports,
            corrected=corrected,
        )
    r = Room(device, link, video, audio, service, probe, board, server)
    async with running(link) as link_task:
        r.link_task = link_task
        if own_hubs:
            r.tasks += [asyncio.create_task(video.run()), asyncio.create_task(audio.run())]
        if server is not None:
            r.tasks.append(asyncio.create_task(server.run(), name=f"test-panel-{device}"))
        r.tasks.append(asyncio.create_task(service.run(), name=f"test-stream-{device}"))
        try:
            if server is not None:
                async with asyncio.timeout(10):
                    await server.wait_ready()
            yield r
        finally:
            for task in reversed(r.tasks):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def until_live(*rooms: Room, within: float = 30.0) -> None:
    await eventually(
        lambda: all(r.joiner.state is JoinState.LIVE for r in rooms),
        within=within,
        what=f"{', '.join(r.device for r in rooms)} live",
    )


async def frames_advance(sink: ProbeSink, source: str, by: int = 10, within: float = 30.0) -> None:
    stats = sink.stats(source)
    start = stats.last_stamp or 0
    await eventually(
        lambda: stats.last_stamp is not None and stats.last_stamp - start >= by,
        within=within,
        what=f"{by} more stamped frames from {source}",
    )


async def panel_request(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One request to the panel at ``base`` (JSON ``body``, or ``raw`` bytes); the reply's
    status and JSON (or its text when it is not JSON)."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base.rstrip("/") + path, data=data, headers=sent) as reply,
    ):
        text = await reply.text()
        try:
            return reply.status, json.loads(text)
        except ValueError:
            return reply.status, text

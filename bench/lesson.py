"""Lesson benchmark: encode-once against aiortc's per-peer encoding, time to picture,
glass-to-glass latency, and a rural link.

Run from a checkout: ``.venv/bin/python bench/lesson.py`` (all default sections, about
2-4 minutes on 2 cores), ``--quick`` for a short run, ``--sections cpu,join,rural,flow``
to choose (``--skip-flow``: only ``cpu``, as before). A summary table with the targets
ends the run.

``cpu``, sender CPU (``--receivers 1,3,6 --seconds --warmup --modes``). The sender (this
process) runs the synthetic camera and either ``naive`` (one aiortc
``VideoStreamTrack`` per peer, so aiortc encodes per peer with its own libx264
settings) or ``once`` (one `SharedH264Encoder`, packets fanned out). The receivers run
in a child process, so their decoding is not billed to the sender; they decode every
frame and read the stamp for fps and glass-to-glass latency (one machine, one clock).
CPU is the sender's process CPU time over wall time (% of one core) while every
receiver is receiving; "capture only" is the camera alone, for reference. Both modes
target 1 Mbps (aiortc's default). aiortc's encoder uses libx264's default preset
(medium) and ours ``ultrafast``, so compare the growth from 1 to N receivers within a
mode as well as the absolute numbers.

``join``, the real lesson flow (``--rooms 1,3,6 --starts 5 --hold 5 --rx-procs 2``): an
embedded Mosquitto and the main room's `StreamService` (1280x720@30 camera, the
daemon's default stream settings) in this process; the receiving rooms, each a full
`StreamService` with its own 320x240 camera and microphone sent back, in
``--rx-procs`` child processes. Each start is ``LessonHost.start_lesson()`` to every
room's first decoded frame of that lesson (monotonic time: one clock for all processes
on a machine), then ``end_lesson()`` and wait for every room to be back in
``waiting``. The last start of each count is held ``--hold`` s: glass-to-glass from the
stamps (capture wall time in the picture against wall time after decode), video fps
and audio gaps per room. "main cpu %" is this process (main room + broker client).

``rural`` (``--rural-rooms 2 --rural-seconds 15 --rural-settle 5 --preset NAME,...``): each
receiving room in a process of its own behind `agent.testkit.impair.impaired` (the main
room is not impaired: half the delay each way in the room's process; MQTT is not
impaired), once per link preset: ``rural-good`` (60 ms RTT, 2 % loss each way, 2 Mbit/s),
``rural-poor`` (150 ms, 5 %, 1 Mbit/s), ``4g-burst`` (80 ms, 50 ms jitter, Gilbert loss in
bursts of 4 averaging 3 %, 3 Mbit/s), ``satellite`` (600 ms, 1 %, 2 Mbit/s), every one with
a 200 ms drop-tail queue; ``--delay --jitter --loss --burst --rate --queue`` change the
chosen presets (alone: one custom link). Over the window, per room: delivered video fps,
glass-to-glass, audio missing (% of the window), video stalls (no new picture for more
than 0.5 s) and the longest, the rate the main room offered the room's link (everything
that reached the shim inbound, media, retransmissions and RTCP) against the link's rate,
the bottleneck's queue drops, and the share of time on each video layer the main room
sends (``PeerSession.describe()["layer"]``, sampled every 0.5 s). Audio gaps come from
the received frames' ``pts`` (the RTP timestamp; aiortc conceals nothing): a jump of
more than 1.5 frame durations is one gap, the jump minus one frame is missing audio.
A Chromium receiving room cannot sit behind the shim: it hooks aioice inside one Python
process, and Chromium has its own network stack.

``--compare`` runs ``join`` and ``rural`` twice, side by side: "before" with
``stream.link``'s rural tuning off (issue 13; ``--baseline`` runs only that) and
"after" with the defaults.

``flow`` (the earlier part 2, not run by default): the same lesson flow with every
room in this process, once, from ``start_lesson()`` to ``live`` and to the first
stamped frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fractions
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from aiortc import RTCSessionDescription, VideoStreamTrack  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

from agent.broker import MosquittoBroker  # noqa: E402
from agent.capture import (  # noqa: E402
    AudioHub,
    FrameHub,
    FrameSubscription,
    open_audio_source,
    open_video_source,
    read_stamp,
)
from agent.config import LinkConfig  # noqa: E402
from agent.config.models import (  # noqa: E402
    AudioConfig,
    BrokerConfig,
    CaptureConfig,
    GroupMembership,
    IdentityConfig,
    LessonRole,
    StreamConfig,
    VideoConfig,
)
from agent.stream import (  # noqa: E402
    EncoderSettings,
    JoinState,
    LessonHost,
    ProbeSink,
    SharedH264Encoder,
    StreamService,
    route_keyframe_requests,
)
from agent.stream.ice import gather, new_peer_connection  # noqa: E402
from agent.stream.peer import h264_preferences  # noqa: E402
from agent.stream.sinks import luma  # noqa: E402
from agent.sync import MqttLink  # noqa: E402
from agent.testkit.impair import PRESETS, LinkImpairment, impaired  # noqa: E402

LOOPBACK = ["127.0.0.1"]
BITRATE_KBPS = 1000


# -- part 1: sender CPU -------------------------------------------------------------------


class NaiveTrack(VideoStreamTrack):
    """What an aiortc user writes: a track per peer yielding frames for aiortc to encode."""

    def __init__(self, hub: FrameHub, name: str) -> None:
        super().__init__()
        self._frames: FrameSubscription = hub.subscribe(name)
        self._origin: int | None = None

    async def recv(self) -> Any:
        frame = await self._frames.get()
        if self._origin is None:
            self._origin = frame.captured_ns
        video = av.VideoFrame.from_ndarray(frame.image, format="bgr24")
        video.pts = (frame.captured_ns - self._origin) * 90_000 // 1_000_000_000
        video.time_base = fractions.Fraction(1, 90_000)
        return video

    def stop(self) -> None:
        super().stop()
        self._frames.close()


def receiver_process(conn: multiprocessing.connection.Connection, count: int) -> None:
    asyncio.run(_receive(conn, count))


async def _receive(conn: multiprocessing.connection.Connection, count: int) -> None:
    probe = ProbeSink()
    pcs = [new_peer_connection([]) for _ in range(count)]
    sinks: list[asyncio.Task[None]] = []
    offers: list[str] = []
    for index, pc in enumerate(pcs):
        pc.addTransceiver("video", direction="recvonly").setCodecPreferences(h264_preferences())

        def on_track(track: Any, name: str = f"r{index}") -> None:
            sinks.append(asyncio.create_task(probe.consume(name, track)))

        pc.on("track", on_track)
        await gather(pc, await pc.createOffer(), LOOPBACK)
        offers.append(pc.localDescription.sdp)
    conn.send(offers)
    answers = await asyncio.to_thread(conn.recv)
    for pc, sdp in zip(pcs, answers, strict=True):
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
    # "mark": start of the measured window; "report": its end.
    await asyncio.to_thread(conn.recv)
    marks = {name: (s.frames, len(s.latencies_ms)) for name, s in probe.sources.items()}
    started = time.monotonic()
    await asyncio.to_thread(conn.recv)
    elapsed = time.monotonic() - started
    report = {}
    for name, stats in probe.sources.items():
        frames0, lat0 = marks.get(name, (0, 0))
        window = list(stats.latencies_ms)[lat0:]
        report[name] = {
            "fps": (stats.frames - frames0) / elapsed,
            "first_frame_s": stats.first_frame_s,
            "p50": statistics.median(window) if window else None,
            "p95": statistics.quantiles(window, n=20)[-1] if len(window) > 1 else None,
        }
    conn.send(report)
    for pc in pcs:
        await pc.close()
    for task in sinks:
        task.cancel()
    await asyncio.gather(*sinks, return_exceptions=True)


@dataclass
class CpuRow:
    mode: str
    receivers: int
    cpu_percent: float
    encodes_per_s: float | None
    min_fps: float | None
    max_first_frame_s: float | None
    p50_ms: float | None
    p95_ms: float | None


async def measure_sender(
    mode: str, count: int, capture: CaptureConfig, seconds: float, warmup_s: float
) -> CpuRow:
    hub = FrameHub(open_video_source(capture.video), capture)
    hub_task = asyncio.create_task(hub.run())
    encoder = SharedH264Encoder(hub, EncoderSettings(bitrate_kbps=BITRATE_KBPS))
    encoder_task = asyncio.create_task(encoder.run())
    pcs: list[Any] = []
    process: Any = None
    parent: Any = None
    try:
        if count:
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            process = ctx.Process(target=receiver_process, args=(child, count), daemon=True)
            process.start()
            offers = await asyncio.to_thread(parent.recv)
            answers = []
            for index, offer in enumerate(offers):
                pc = new_peer_connection([])
                pcs.append(pc)
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
                if mode == "once":
                    sender = pc.addTrack(encoder.track(f"r{index}"))
                    route_keyframe_requests(sender, encoder.request_keyframe)
                else:
                    pc.addTrack(NaiveTrack(hub, f"naive{index}"))
                await gather(pc, await pc.createAnswer(), LOOPBACK)
                answers.append(pc.localDescription.sdp)
            parent.send(answers)
        await asyncio.sleep(warmup_s)
        if parent is not None:
            parent.send("mark")
        encodes0 = encoder.frames_encoded
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        encodes = (encoder.frames_encoded - encodes0) / wall if mode == "once" and count else None
        report: dict[str, dict[str, Any]] = {}
        if parent is not None:
            parent.send("report")
            report = await asyncio.to_thread(parent.recv)
        fps = [r["fps"] for r in report.values()]
        firsts = [r["first_frame_s"] for r in report.values() if r["first_frame_s"] is not None]
        p50s = [r["p50"] for r in report.values() if r["p50"] is not None]
        p95s = [r["p95"] for r in report.values() if r["p95"] is not None]
        return CpuRow(
            mode,
            count,
            100 * cpu / wall,
            encodes,
            min(fps) if fps else None,
            max(firsts) if firsts else None,
            statistics.median(p50s) if p50s else None,
            max(p95s) if p95s else None,
        )
    finally:
        for pc in pcs:
            await pc.close()
        if process is not None:
            await asyncio.to_thread(process.join, 10)
        for task in (encoder_task, hub_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- part 2: time to picture through the lesson flow -----------------------------------------


@dataclass
class FlowRow:
    room: str
    live_s: float | None
    first_frame_s: float | None


async def lesson_flow(count: int, capture: CaptureConfig, timeout_s: float = 30.0) -> list[FlowRow]:
    broker = MosquittoBroker()
    await broker.start()
    small = CaptureConfig(video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig())
    rooms = [f"rural{i}.room1" for i in range(1, count + 1)]
    tasks: list[asyncio.Task[None]] = []
    services: dict[str, tuple[StreamService, ProbeSink]] = {}
    try:
        for device in ["central.room1", *rooms]:
            main = device == "central.room1"
            cfg = capture if main else small
            site, room = device.split(".")
            role = LessonRole.MAIN if main else LessonRole.RECEIVING
            link = MqttLink(
                _broker_config(broker.url),
                IdentityConfig(
                    site=site,
                    room=room,
                    groups=[
                        GroupMembership(group="g1", role=role, receivers=rooms if main else [])
                    ],
                ),
                software_version="bench",
                profile_name="virtual",
            )
            video = FrameHub(open_video_source(cfg.video), cfg)
            audio = AudioHub(open_audio_source(cfg.audio), cfg)
            probe = ProbeSink()
            service = StreamService(
                link,
                video,
                audio,
                StreamConfig(video_bitrate_kbps=BITRATE_KBPS),
                host_addresses=LOOPBACK,
                sink=probe,
            )
            services[device] = (service, probe)
            for coro in (link.run(), video.run(), audio.run(), service.run()):
                tasks.append(asyncio.create_task(coro))
        host = services["central.room1"][0].hosts["g1"]
        await asyncio.sleep(1.0)  # links connected, hubs open
        started = time.monotonic()
        await host.start_lesson("bench")
        live: dict[str, float] = {}
        first: dict[str, float] = {}
        deadline = started + timeout_s
        while len(first) < count and time.monotonic() < deadline:
            now = time.monotonic() - started
            for device in rooms:
                service, probe = services[device]
                joiner = service.joiner
                if joiner is not None and joiner.state is JoinState.LIVE:
                    live.setdefault(device, now)
                if probe.stats("central.room1").stamped:
                    first.setdefault(device, now)
            await asyncio.sleep(0.01)
        await host.end_lesson()
        return [FlowRow(d, live.get(d), first.get(d)) for d in rooms]
    finally:
        for task in reversed(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await broker.stop()


def _broker_config(url: str) -> BrokerConfig:
    return BrokerConfig(url=url, topic_prefix="bench", reconnect_min_s=0.05, reconnect_max_s=0.5)


# -- part 3: receiving rooms in their own processes (join, glass-to-glass, rural link) -------

MAIN_ROOM = "central.room1"
RTP_WRAP = 1 << 32
VIDEO_STALL_S = 0.5  # no new picture for this long: a stall a viewer sees


@dataclass
class Window:
    """What one receiving room saw of the main room's media since the last "mark"."""

    started: float = field(default_factory=time.monotonic)
    video_frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    audio_frames: int = 0
    audio_gaps: int = 0
    audio_missing_ms: float = 0.0
    audio_stalls: int = 0  # arrival gaps longer than 1.5 frames (jitter, not loss)
    longest_stall_ms: float = 0.0
    last_video: float | None = None
    video_stalls: int = 0  # no new picture for more than VIDEO_STALL_S
    longest_video_gap_s: float = 0.0

    def video_frame(self, now: float) -> None:
        self.video_frames += 1
        gap = now - (self.started if self.last_video is None else self.last_video)
        if gap > VIDEO_STALL_S:
            self.video_stalls += 1
        self.longest_video_gap_s = max(self.longest_video_gap_s, gap)
        self.last_video = now

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = max(1e-6, now - self.started)
        # A picture that stopped before the window ended is a stall too.
        tail = now - (self.started if self.last_video is None else self.last_video)
        return {
            "seconds": elapsed,
            "fps": self.video_frames / elapsed,
            "latencies_ms": self.latencies_ms,
            "audio_frames": self.audio_frames,
            "audio_gaps": self.audio_gaps,
            "audio_missing_ms": self.audio_missing_ms,
            "audio_stalls": self.audio_stalls,
            "longest_stall_ms": self.longest_stall_ms,
            "video_stalls": self.video_stalls + (tail > VIDEO_STALL_S),
            "longest_video_gap_s": max(self.longest_video_gap_s, tail),
        }


class RoomSink:
    """A receiving room's screen and loudspeaker, as the benchmark reads them.

    Video: the first decoded frame of each lesson (reported at once, in monotonic time,
    which is one clock for every process on the machine), frames per second and the
    stamp's glass-to-glass latency. Audio: aiortc hands decoded Opus frames over with
    the RTP timestamp as ``pts`` (48 kHz) and conceals nothing, so a lost packet is a
    jump of the pts by more than one frame: a jump above 1.5 frame durations counts as
    one gap and ``jump - one frame`` as missing audio. Arrival gaps above 1.5 frame
    durations ("stalls") are counted apart: late audio, not lost audio.
    """

    def __init__(self, room: str, lesson_of: Any, emit: Any) -> None:
        self.room = room
        self._lesson_of = lesson_of
        self._emit = emit
        self._seen: set[str] = set()
        self.window = Window()

    async def consume(self, source: str, track: Any) -> None:
        kind = str(track.kind)
        last_pts: int | None = None
        last_arrival: float | None = None
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                window = self.window
                if kind == "audio":
                    window.audio_frames += 1
                    rate = frame.sample_rate or 48_000
                    duration_ms = 1000 * frame.samples / rate
                    if last_pts is not None and frame.pts is not None:
                        jump = (frame.pts - last_pts) % RTP_WRAP
                        if frame.samples * 1.5 < jump < RTP_WRAP // 2:
                            window.audio_gaps += 1
                            window.audio_missing_ms += 1000 * (jump - frame.samples) / rate
                    if last_arrival is not None:
                        gap_ms = 1000 * (now - last_arrival)
                        if gap_ms > 1.5 * duration_ms:
                            window.audio_stalls += 1
                            window.longest_stall_ms = max(window.longest_stall_ms, gap_ms)
                    last_pts, last_arrival = frame.pts, now
                    continue
                lesson = self._lesson_of()
                if lesson is not None and lesson not in self._seen:
                    self._seen.add(lesson)
                    self._emit(("first", self.room, lesson, now))
                window.video_frame(now)
                stamp = read_stamp(luma(frame))
                if stamp is not None:
                    window.latencies_ms.append((time.time_ns() - stamp.time_ns) / 1e6)
        except MediaStreamError:
            return


@dataclass(frozen=True)
class RoomsSpec:
    """What one child process runs: receiving rooms of group g1 on this broker."""

    rooms: tuple[str, ...]
    broker_url: str
    impairment: LinkImpairment | None = None
    send_back: bool = True  # each room's own 320x240 camera and microphone, sent back
    stream: StreamConfig = field(default_factory=StreamConfig)


def rooms_process(
    commands: multiprocessing.connection.Connection,
    events: multiprocessing.connection.Connection,
    spec: RoomsSpec,
) -> None:
    asyncio.run(_rooms_main(commands, events, spec))


async def _rooms_main(
    commands: multiprocessing.connection.Connection,
    events: multiprocessing.connection.Connection,
    spec: RoomsSpec,
) -> None:
    with contextlib.ExitStack() as stack:
        link_stats = None
        if spec.impairment is not None:
            link_stats = stack.enter_context(impaired(spec.impairment))
        inbox = _reader(commands)
        small = CaptureConfig(video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig())
        tasks: list[asyncio.Task[None]] = []
        sinks: dict[str, RoomSink] = {}
        links: list[MqttLink] = []
        try:
            for device in spec.rooms:
                site, room = device.split(".")
                link = MqttLink(
                    _broker_config(spec.broker_url),
                    IdentityConfig(
                        site=site,
                        room=room,
                        groups=[GroupMembership(group="g1", role=LessonRole.RECEIVING)],
                    ),
                    software_version="bench",
                    profile_name="virtual",
                )
                links.append(link)
                video = FrameHub(open_video_source(small.video), small) if spec.send_back else None
                audio = AudioHub(open_audio_source(small.audio), small) if spec.send_back else None
                holder: list[StreamService] = []

                def lesson_of(holder: list[StreamService] = holder) -> str | None:
                    joiner = holder[0].joiner if holder else None
                    lesson = None if joiner is None else joiner.lesson
                    return None if lesson is None else lesson.lesson_id

                sink = RoomSink(device, lesson_of, events.send)
                service = StreamService(
                    link,
                    video,
                    audio,
                    spec.stream,
                    host_addresses=LOOPBACK,
                    sink=sink,
                )
                holder.append(service)
                sinks[device] = sink
                joiner = service.joiner
                assert joiner is not None

                def on_state(state: JoinState, _lesson: Any, device: str = device) -> None:
                    events.send(("state", device, str(state)))

                joiner.add_state_listener(on_state)
                tasks.append(asyncio.create_task(link.run()))
                for hub in (video, audio):
                    if hub is not None:
                        tasks.append(asyncio.create_task(hub.run()))
                tasks.append(asyncio.create_task(service.run()))
            async with asyncio.timeout(20):
                for link in links:
                    await link.wait_connected()
            events.send(("ready", spec.rooms))
            shim_mark: dict[str, dict[str, int]] | None = None
            while True:
                command = await inbox.get()
                if command == "mark":
                    for sink in sinks.values():
                        sink.window = Window()
                    shim_mark = None if link_stats is None else link_stats.describe()
                elif command == "report":
                    summary = {d: s.window.summary() for d, s in sinks.items()}
                    shim = None
                    if link_stats is not None:
                        shim = _since(shim_mark, link_stats.describe())
                    events.send(("report", summary, shim))
                else:  # "stop", or the parent went away
                    break
        finally:
            for task in reversed(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            asyncio.get_running_loop().remove_reader(commands.fileno())


def _since(
    mark: dict[str, dict[str, int]] | None, now: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """The shim's counters over the window (``now`` minus ``mark``), per direction."""
    if mark is None:
        return now
    return {way: {k: v - mark[way].get(k, 0) for k, v in d.items()} for way, d in now.items()}


def _reader(conn: multiprocessing.connection.Connection) -> asyncio.Queue[Any]:
    """The messages arriving on ``conn`` as a queue, read on the event loop (no thread):
    ``None`` when the other end is gone."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            while conn.poll():
                queue.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            queue.put_nowait(None)

    loop.add_reader(conn.fileno(), readable)
    return queue


class LessonBench:
    """An embedded Mosquitto, the main room (1280x720 camera, encode-once, in this
    process) and N receiving rooms in child processes (``rooms_per_process`` each): the
    real lesson flow from the teacher's button to pictures on the rooms' screens."""

    def __init__(
        self,
        count: int,
        capture: CaptureConfig,
        *,
        processes: int,
        impairment: LinkImpairment | None = None,
        stream: StreamConfig | None = None,
    ) -> None:
        self.rooms = [f"rural{i}.room1" for i in range(1, count + 1)]
        self.stream = stream or StreamConfig()
        self.capture = capture
        self.processes = max(1, min(processes, count))
        self.impairment = impairment
        self.firsts: dict[tuple[str, str], float] = {}
        self.states: dict[str, str] = {}
        self.reports: list[tuple[dict[str, Any], Any]] = []
        self._ready = 0
        self._children: list[tuple[Any, Any, Any]] = []  # process, commands, events
        self._tasks: list[asyncio.Task[None]] = []
        self.broker = MosquittoBroker()
        self.host: LessonHost | None = None

    async def __aenter__(self) -> LessonBench:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        await self.broker.start()
        site, room = MAIN_ROOM.split(".")
        link = MqttLink(
            _broker_config(self.broker.url),
            IdentityConfig(
                site=site,
                room=room,
                groups=[GroupMembership(group="g1", role=LessonRole.MAIN, receivers=self.rooms)],
            ),
            software_version="bench",
            profile_name="virtual",
        )
        video = FrameHub(open_video_source(self.capture.video), self.capture)
        audio = AudioHub(open_audio_source(self.capture.audio), self.capture)
        service = StreamService(link, video, audio, self.stream, host_addresses=LOOPBACK)
        self.host = service.hosts["g1"]
        for coro in (link.run(), video.run(), audio.run(), service.run()):
            self._tasks.append(asyncio.create_task(coro))
        ctx = multiprocessing.get_context("spawn")
        groups = [self.rooms[i :: self.processes] for i in range(self.processes)]
        for rooms in groups:
            commands_r, commands_w = ctx.Pipe(duplex=False)
            events_r, events_w = ctx.Pipe(duplex=False)
            spec = RoomsSpec(tuple(rooms), self.broker.url, self.impairment, stream=self.stream)
            process = ctx.Process(
                target=rooms_process, args=(commands_r, events_w, spec), daemon=True
            )
            process.start()
            commands_r.close()
            events_w.close()
            self._children.append((process, commands_w, events_r))
            self._tasks.append(asyncio.create_task(self._pump(events_r)))
        await link.wait_connected(timeout=20)
        if not await self._until(lambda: self._ready == len(self._children), 60, "rooms"):
            raise RuntimeError("the receiving rooms did not start")

    async def _pump(self, conn: Any) -> None:
        queue = _reader(conn)
        while (event := await queue.get()) is not None:
            if event[0] == "first":
                self.firsts.setdefault((event[1], event[2]), event[3])
            elif event[0] == "state":
                self.states[event[1]] = event[2]
            elif event[0] == "ready":
                self._ready += 1
            elif event[0] == "report":
                self.reports.append((event[1], event[2]))

    async def _until(self, condition: Any, within: float, what: str) -> bool:
        deadline = time.monotonic() + within
        while not condition():
            if time.monotonic() > deadline:
                print(f"  (timed out after {within:g} s waiting for {what})", flush=True)
                return False
            await asyncio.sleep(0.01)
        return True

    def _send(self, command: str) -> None:
        for _, commands, _ in self._children:
            commands.send(command)

    async def start(self, within: float = 30.0) -> tuple[str, dict[str, float | None]]:
        """Press the button; seconds from it to each room's first decoded frame."""
        assert self.host is not None
        pressed = time.monotonic()
        lesson = (await self.host.start_lesson("bench")).lesson_id
        await self._until(
            lambda: all((r, lesson) in self.firsts for r in self.rooms), within, "first frames"
        )
        return lesson, {
            r: (self.firsts[(r, lesson)] - pressed) if (r, lesson) in self.firsts else None
            for r in self.rooms
        }

    async def end(self) -> None:
        assert self.host is not None
        await self.host.end_lesson()
        await self._until(
            lambda: all(self.states.get(r) == "waiting" for r in self.rooms), 20, "rooms waiting"
        )

    async def window(self, seconds: float) -> tuple[dict[str, dict[str, Any]], Any, Any]:
        """Every room's media over ``seconds``; the layer each room's video is on at the
        end (and the share of time on each, sampled every 0.5 s); the shim's counters."""
        assert self.host is not None
        self.reports.clear()
        self._send("mark")
        layers: dict[str, dict[str, int]] = {r: {} for r in self.rooms}
        ended = time.monotonic() + seconds
        while time.monotonic() < ended:
            await asyncio.sleep(0.5)
            for room, session in self.host.sessions().items():
                layer = str(session.describe().get("layer"))
                layers[room][layer] = layers[room].get(layer, 0) + 1
        final = {r: s.describe() for r, s in self.host.sessions().items()}
        self._send("report")
        await self._until(lambda: len(self.reports) == len(self._children), 20, "reports")
        merged: dict[str, dict[str, Any]] = {}
        shims = []
        for summary, shim in self.reports:
            merged.update(summary)
            shims.append(shim)
        return merged, {"final": final, "samples": layers}, shims

    async def close(self) -> None:
        for _process, commands, _events in self._children:
            with contextlib.suppress(OSError):
                commands.send("stop")
        for process, commands, _events in self._children:
            await asyncio.to_thread(process.join, 20)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
            commands.close()
        for task in reversed(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, _, events in self._children:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(events.fileno())
            events.close()
        self._children.clear()
        await self.broker.stop()


def _quantile(data: list[float], q: float) -> float | None:
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    return statistics.quantiles(sorted(data), n=100, method="inclusive")[
        min(98, max(0, round(q * 100) - 1))
    ]


@dataclass
class JoinRow:
    rooms: int
    processes: int
    joins_s: list[float]
    failed: int
    g2g_ms: list[float]
    fps: list[float]
    cpu_percent: float
    audio_gaps: int = 0
    audio_missing_ms: float = 0.0


async def measure_joins(
    count: int,
    capture: CaptureConfig,
    starts: int,
    hold_s: float,
    processes: int,
    *,
    stream: StreamConfig | None = None,
) -> JoinRow:
    """``starts`` lessons with ``count`` rooms: button to each room's first frame; the
    last one is held ``hold_s`` for glass-to-glass and fps."""
    joins: list[float] = []
    failed = 0
    g2g: list[float] = []
    fps: list[float] = []
    gaps, missing = 0, 0.0
    async with LessonBench(count, capture, processes=processes, stream=stream) as bench:
        cpu0, wall0 = time.process_time(), time.monotonic()
        for index in range(starts):
            _, times = await bench.start()
            joins += [t for t in times.values() if t is not None]
            failed += sum(1 for t in times.values() if t is None)
            if index == starts - 1 and hold_s > 0:
                await asyncio.sleep(1.0)  # past the first keyframe's burst
                summary, _, _ = await bench.window(hold_s)
                for room in summary.values():
                    g2g += room["latencies_ms"]
                    fps.append(room["fps"])
                    gaps += room["audio_gaps"]
                    missing += room["audio_missing_ms"]
            await bench.end()
            await asyncio.sleep(0.3)
        cpu = 100 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
    return JoinRow(count, bench.processes, joins, failed, g2g, fps, cpu, gaps, missing)


@dataclass
class RuralRow:
    rooms: int
    impairment: LinkImpairment
    joins_s: list[float | None]
    rooms_summary: dict[str, dict[str, Any]]
    layers: dict[str, Any]
    shims: list[Any]  # per room (one room per process), the shim's counters over the window


async def measure_rural(
    count: int,
    capture: CaptureConfig,
    impairment: LinkImpairment,
    settle_s: float,
    seconds: float,
    *,
    stream: StreamConfig | None = None,
) -> RuralRow:
    """``count`` rooms, each in its own process behind its own impaired link."""
    async with LessonBench(
        count, capture, processes=count, impairment=impairment, stream=stream
    ) as bench:
        _, times = await bench.start(within=60)
        await asyncio.sleep(settle_s)
        summary, layers, shims = await bench.window(seconds)
        await bench.end()
    return RuralRow(count, impairment, list(times.values()), summary, layers, shims)


# -- main -----------------------------------------------------------------------------------


def _print_rural(preset: str, row: RuralRow, summary: list[tuple[str, str, str]]) -> None:
    """One table row per room; the worst room's figures into the summary."""
    print(
        f"{'room':<14}{'join s':>7}{'fps':>6}{'g2g p50':>9}{'p95 ms':>8}{'audio miss':>11}"
        f"{'stalls':>7}{'longest s':>10}{'send kbps':>10}{'link':>6}{'q drops':>8}"
        "  layer time (share of 0.5 s samples)"
    )
    link_kbps = row.impairment.rate_kbps
    worst: dict[str, float] = {}
    for index, (room, join) in enumerate(zip(sorted(row.rooms_summary), row.joins_s, strict=False)):
        data = row.rooms_summary[room]
        samples = row.layers["samples"].get(room, {})
        total = max(1, sum(samples.values()))
        layer_time = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(samples.items()))
        shim = row.shims[index] if index < len(row.shims) and row.shims[index] else {}
        inbound = shim.get("in", {})
        send_kbps = 8 * inbound.get("bytes_offered", 0) / 1000 / max(1e-6, data["seconds"])
        missing = 100 * data["audio_missing_ms"] / (1000 * data["seconds"])
        p95 = _quantile(data["latencies_ms"], 0.95)
        print(
            f"{room:<14}{_fmt(join, '.2f'):>7}{data['fps']:>6.1f}"
            f"{_fmt(_quantile(data['latencies_ms'], 0.5), '.0f'):>9}{_fmt(p95, '.0f'):>8}"
            f"{missing:>10.1f}%{data['video_stalls']:>7}{data['longest_video_gap_s']:>10.1f}"
            f"{send_kbps:>10.0f}{_fmt(link_kbps, '.0f'):>6}{inbound.get('dropped_queue', 0):>8}"
            f"  {layer_time}",
            flush=True,
        )
        worst["fps"] = min(worst.get("fps", 1e9), data["fps"])
        worst["p95"] = max(worst.get("p95", 0.0), p95 or 0.0)
        worst["missing"] = max(worst.get("missing", 0.0), missing)
        worst["gap"] = max(worst.get("gap", 0.0), data["longest_video_gap_s"])
    if worst:
        summary.append(
            (
                f"{preset}: worst room fps / g2g p95 / audio missing / longest stall",
                f"{worst['fps']:.1f} fps / {worst['p95']:.0f} ms / {worst['missing']:.1f} % / "
                f"{worst['gap']:.1f} s",
                RURAL_TARGETS.get(preset.split(maxsplit=1)[0], ""),
            )
        )


MODES: dict[str, tuple[str, StreamConfig]] = {
    "before": (
        "issue 13 off (aiortc's 96 kbit/s stereo Opus, no RED, no keyframe limit per room, "
        "aiortc's video jitter buffer, 1 s keyframe bursts, rooms start on the high layer, "
        "no floor layer)",
        StreamConfig(link=LinkConfig.baseline()),
    ),
    "after": ("the defaults (speech Opus 32 kbit/s with FEC, RED, ...)", StreamConfig()),
}

RURAL_TARGETS = {
    "rural-poor": "p95 <= 400 ms, >= 15 fps (or audio only), audio <= 1 %",
    "rural-good": "30 fps, p95 <= 200 ms, audio <= 0.5 %",
    "4g-burst": "stall <= 2 s, audio <= 2 %",
    "satellite": "stall <= 2 s, audio <= 2 %",
}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


RURAL = PRESETS["rural-good"]


def _impairment(args: argparse.Namespace) -> list[tuple[str, LinkImpairment]]:
    """The links to run: the named presets, or one built from the options."""
    custom = {
        "delay_ms": args.delay,
        "jitter_ms": args.jitter,
        "loss": args.loss,
        "loss_burst": args.burst,
        "rate_kbps": args.rate,
        "queue_ms": args.queue,
    }
    given = {k: v for k, v in custom.items() if v is not None}
    links: list[tuple[str, LinkImpairment]] = []
    for name in args.preset.split(","):
        if name not in PRESETS:
            raise SystemExit(f"--preset {name}: unknown; choose from {', '.join(PRESETS)}")
        label = name + "".join(f" {k}={v:g}" for k, v in given.items())
        links.append((label, dataclasses.replace(PRESETS[name], **given)))
    if given and not args.preset_given:
        links = [("custom", dataclasses.replace(PRESETS["rural-good"], **given))]
    return links


def _describe_link(imp: LinkImpairment) -> str:
    burst = f" (bursts of {imp.loss_burst:g})" if imp.loss_burst > 1 else ""
    loss = f"{imp.loss:.0%} loss{burst}"
    jitter = f" ±{imp.jitter_ms / 2:g} ms jitter," if imp.jitter_ms else ""
    rate = "unlimited" if imp.rate_kbps is None else f"{imp.rate_kbps:g} kbit/s"
    return f"{imp.delay_ms:g} ms RTT,{jitter} {loss} each way, {rate} (queue {imp.queue_ms:g} ms)"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the main camera")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument(
        "--sections",
        default="cpu,join,rural",
        help="any of cpu (sender CPU, naive vs once), join (button to picture, "
        "glass-to-glass), rural (impaired link), flow (the old in-process time to picture)",
    )
    parser.add_argument("--receivers", default="1,3,6", help="cpu: receiver counts, e.g. 1,3")
    parser.add_argument("--seconds", type=float, default=6.0, help="cpu: measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="cpu: seconds before measuring")
    parser.add_argument("--modes", default="naive,once", help="cpu: modes")
    parser.add_argument("--skip-flow", action="store_true", help="only the CPU comparison")
    parser.add_argument("--rooms", default="1,3,6", help="join: receiving room counts")
    parser.add_argument("--starts", type=int, default=5, help="join: lessons started per count")
    parser.add_argument("--hold", type=float, default=5.0, help="join: glass-to-glass window")
    parser.add_argument("--rx-procs", type=int, default=2, help="join: receiver processes")
    parser.add_argument("--rural-rooms", type=int, default=2, help="rural: rooms (1 process each)")
    parser.add_argument("--rural-seconds", type=float, default=15.0, help="rural: window")
    parser.add_argument("--rural-settle", type=float, default=5.0, help="rural: before window")
    parser.add_argument(
        "--preset",
        default=None,
        help=f"rural: link presets, comma-separated, from {', '.join(PRESETS)} "
        "(default: all; rural-good with --quick)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="join, rural: turn issue 13's behaviour off (stream.link): the 'before'",
    )
    parser.add_argument(
        "--compare", action="store_true", help="join, rural: before and after, side by side"
    )
    parser.add_argument("--delay", type=float, help="rural: RTT ms (overrides the preset)")
    parser.add_argument("--jitter", type=float, help="rural: peak-to-peak RTT jitter ms")
    parser.add_argument("--loss", type=float, help="rural: loss each way, 0..1")
    parser.add_argument("--burst", type=float, help="rural: mean loss burst, packets (Gilbert)")
    parser.add_argument("--rate", type=float, help="rural: bottleneck kbit/s each way")
    parser.add_argument("--queue", type=float, help="rural: bottleneck queue ms (drop-tail)")
    parser.add_argument(
        "--quick", action="store_true", help="a short run: 1,3 rooms, 2 starts, short windows"
    )
    args = parser.parse_args()
    args.preset_given = args.preset is not None
    if args.preset is None:
        args.preset = "rural-good" if args.quick else ",".join(PRESETS)
    if args.skip_flow:
        args.sections = "cpu"
    if args.quick:
        args.receivers, args.rooms, args.starts = "1,3", "1,3", 2
        args.seconds, args.warmup, args.hold = 3.0, 2.0, 3.0
        args.rural_rooms, args.rural_seconds, args.rural_settle = 1, 6.0, 2.0
    return args


async def main() -> None:
    args = _parse()
    width, height = (int(v) for v in args.size.lower().split("x"))
    capture = CaptureConfig(video=VideoConfig(width=width, height=height, fps=args.fps))
    sections = set(args.sections.split(","))
    began = time.monotonic()
    size = f"{width}x{height}@{args.fps:g}"
    summary: list[tuple[str, str, str]] = []  # figure, value, target

    cpu_rows: list[CpuRow] = []
    if "cpu" in sections:
        counts = [int(c) for c in args.receivers.split(",")]
        modes = args.modes.split(",")
        print(f"== sender CPU, {size}, {BITRATE_KBPS} kbps, {args.seconds:g} s", flush=True)
        cpu_rows = [await measure_sender("once", 0, capture, args.seconds, 1.0)]
        cpu_rows[0].mode = "capture only"
        for mode in modes:
            for count in counts:
                cpu_rows.append(
                    await measure_sender(mode, count, capture, args.seconds, args.warmup)
                )
        base = {r.mode: r.cpu_percent for r in cpu_rows if r.receivers == counts[0]}
        print(
            f"{'mode':<13}{'rx':>3}{'cpu %':>8}{'x first':>9}{'enc/s':>7}{'min fps':>9}"
            f"{'1st frame s':>12}{'g2g p50 ms':>11}{'p95 ms':>8}"
        )
        for r in cpu_rows:
            growth = r.cpu_percent / base[r.mode] if r.mode in base and r.receivers else None
            print(
                f"{r.mode:<13}{r.receivers:>3}{r.cpu_percent:>8.1f}{_fmt(growth, '.2f'):>9}"
                f"{_fmt(r.encodes_per_s, '.1f'):>7}{_fmt(r.min_fps, '.1f'):>9}"
                f"{_fmt(r.max_first_frame_s, '.2f'):>12}{_fmt(r.p50_ms, '.0f'):>11}"
                f"{_fmt(r.p95_ms, '.0f'):>8}"
            )
        top = max(counts)
        for mode in modes:
            first = next((r for r in cpu_rows if r.mode == mode and r.receivers == counts[0]), None)
            last = next((r for r in cpu_rows if r.mode == mode and r.receivers == top), None)
            if first is not None and last is not None and top != counts[0]:
                target = "<= 1.5x" if mode == "once" else "(reference)"
                summary.append(
                    (
                        f"sender CPU {top} rooms / {counts[0]} room, {mode}",
                        f"{last.cpu_percent / first.cpu_percent:.2f}x "
                        f"({first.cpu_percent:.0f}% -> {last.cpu_percent:.0f}%, "
                        f"min fps {_fmt(last.min_fps, '.0f')})",
                        target,
                    )
                )

    if "join" in sections:
        counts = [int(c) for c in args.rooms.split(",")]
        print(
            f"\n== button to first decoded frame, {size}, lesson defaults "
            f"({StreamConfig().video_bitrate_kbps} kbps), {args.starts} starts per count, "
            f"receiving rooms in up to {args.rx_procs} processes (each sends its 320x240 "
            "camera and microphone back)",
            flush=True,
        )
        print(
            f"{'rooms':>5}{'procs':>6}{'joins':>6}{'fail':>5}{'median s':>10}{'p95 s':>7}"
            f"{'max s':>7}{'g2g p50':>9}{'p95 ms':>8}{'min fps':>9}{'main cpu %':>11}"
            "  audio gaps / missing ms (all rooms, hold window)"
        )
        join_modes = (
            ["before", "after"] if args.compare else ["before" if args.baseline else "after"]
        )
        for count, mode in ((c, m) for c in counts for m in join_modes):
            row = await measure_joins(
                count, capture, args.starts, args.hold, args.rx_procs, stream=MODES[mode][1]
            )
            label = f" {mode}" if len(join_modes) > 1 else ""
            print(
                f"{row.rooms:>5}{row.processes:>6}{len(row.joins_s):>6}{row.failed:>5}"
                f"{_fmt(_quantile(row.joins_s, 0.5), '.2f'):>10}"
                f"{_fmt(_quantile(row.joins_s, 0.95), '.2f'):>7}"
                f"{_fmt(max(row.joins_s, default=None), '.2f'):>7}"
                f"{_fmt(_quantile(row.g2g_ms, 0.5), '.0f'):>9}"
                f"{_fmt(_quantile(row.g2g_ms, 0.95), '.0f'):>8}"
                f"{_fmt(min(row.fps, default=None), '.1f'):>9}{row.cpu_percent:>11.0f}"
                f"  {row.audio_gaps} / {row.audio_missing_ms:.0f}{label}",
                flush=True,
            )
            summary.append(
                (
                    f"join, {count} room(s){label}: median / p95",
                    f"{_fmt(_quantile(row.joins_s, 0.5), '.2f')} / "
                    f"{_fmt(_quantile(row.joins_s, 0.95), '.2f')} s"
                    + (f" ({row.failed} failed)" if row.failed else ""),
                    "p95 <= 2 s" if count >= 6 else "",
                )
            )
            summary.append(
                (
                    f"glass-to-glass {size}, {count} room(s){label}: median / p95",
                    f"{_fmt(_quantile(row.g2g_ms, 0.5), '.0f')} / "
                    f"{_fmt(_quantile(row.g2g_ms, 0.95), '.0f')} ms",
                    "median <= 120 ms",
                )
            )

    if "rural" in sections:
        modes = ["before", "after"] if args.compare else ["before" if args.baseline else "after"]
        for preset, imp in _impairment(args):
            print(
                f"\n== {preset}: {args.rural_rooms} room(s), each in its own process behind "
                f"{_describe_link(imp)}; {args.rural_seconds:g} s window after "
                f"{args.rural_settle:g} s",
                flush=True,
            )
            for mode in modes:
                if len(modes) > 1:
                    print(f"-- {mode}: {MODES[mode][0]}", flush=True)
                row_r = await measure_rural(
                    args.rural_rooms,
                    capture,
                    imp,
                    args.rural_settle,
                    args.rural_seconds,
                    stream=MODES[mode][1],
                )
                _print_rural(f"{preset} {mode}" if len(modes) > 1 else preset, row_r, summary)

    if "flow" in sections:
        count = max(int(c) for c in args.receivers.split(","))
        print(f"\n== lesson flow in one process (MQTT + offer/answer + ICE/DTLS), {count} rooms")
        for flow in await lesson_flow(count, capture):
            print(
                f"{flow.room:<16} live after {_fmt(flow.live_s, '.2f')} s, "
                f"first stamped frame after {_fmt(flow.first_frame_s, '.2f')} s"
            )

    if summary:
        print(f"\n== summary ({time.monotonic() - began:.0f} s, {os.cpu_count()} cores)")
        width_f = max(len(f) for f, _, _ in summary)
        width_v = max(len(v) for _, v, _ in summary)
        for figure, value, target in summary:
            print(f"{figure:<{width_f}}  {value:<{width_v}}  {target}")


if __name__ == "__main__":
    asyncio.run(main())

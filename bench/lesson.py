"""Lesson benchmark: encode-once against aiortc's per-peer encoding, and time to picture.

Run from a checkout: ``.venv/bin/python bench/lesson.py [--size 640x360] [--fps 30]
[--receivers 1,3] [--seconds 8]``.

Part 1, sender CPU. The sender (this process) runs the synthetic camera and either
``naive`` (one aiortc ``VideoStreamTrack`` per peer, so aiortc encodes per peer with its
own libx264 settings) or ``once`` (one `SharedH264Encoder`, packets fanned out). The
receivers run in a child process, so their decoding is not billed to the sender; they
decode every frame and read the stamp for fps and glass-to-glass latency (one machine,
one clock). CPU is the sender's process CPU time over wall time (% of one core) while
every receiver is receiving; "capture only" is the camera alone, for reference. Both
modes target 1 Mbps (aiortc's default). aiortc's encoder uses libx264's default preset
(medium) and ours ``ultrafast``, so compare the growth from 1 to N receivers within a
mode as well as the absolute numbers.

Part 2, time to picture through the real lesson flow: an embedded Mosquitto, a main
room's `StreamService` and N receiving rooms' (each with its own 320x240 camera sent
back), in this process: from ``start_lesson()`` to each room ``live`` and to its first
decoded, stamped frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import multiprocessing
import multiprocessing.connection
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from aiortc import RTCSessionDescription, VideoStreamTrack  # noqa: E402

from agent.capture import (  # noqa: E402
    AudioHub,
    FrameHub,
    FrameSubscription,
    open_audio_source,
    open_video_source,
)
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
    ProbeSink,
    SharedH264Encoder,
    StreamService,
    route_keyframe_requests,
)
from agent.stream.ice import gather, new_peer_connection  # noqa: E402
from agent.stream.peer import h264_preferences  # noqa: E402
from agent.sync import MosquittoBroker, MqttLink  # noqa: E402

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


# -- main -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the main camera")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--receivers", default="1,3", help="receiver counts, e.g. 1,3")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per case")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--modes", default="naive,once")
    parser.add_argument("--skip-flow", action="store_true", help="only the CPU comparison")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    capture = CaptureConfig(video=VideoConfig(width=width, height=height, fps=args.fps))
    counts = [int(c) for c in args.receivers.split(",")]
    modes = args.modes.split(",")

    print(f"sender CPU, {width}x{height}@{args.fps:g}, {BITRATE_KBPS} kbps, {args.seconds:g} s")
    rows = [await measure_sender("once", 0, capture, args.seconds, 1.0)]
    rows[0].mode = "capture only"
    for mode in modes:
        for count in counts:
            rows.append(await measure_sender(mode, count, capture, args.seconds, args.warmup))
    base = {r.mode: r.cpu_percent for r in rows if r.receivers == counts[0]}
    print(
        f"{'mode':<13}{'rx':>3}{'cpu %':>8}{'x first':>9}{'enc/s':>7}{'min fps':>9}"
        f"{'1st frame s':>12}{'g2g p50 ms':>11}{'p95 ms':>8}"
    )
    for r in rows:
        growth = r.cpu_percent / base[r.mode] if r.mode in base and r.receivers else None
        print(
            f"{r.mode:<13}{r.receivers:>3}{r.cpu_percent:>8.1f}{_fmt(growth, '.2f'):>9}"
            f"{_fmt(r.encodes_per_s, '.1f'):>7}{_fmt(r.min_fps, '.1f'):>9}"
            f"{_fmt(r.max_first_frame_s, '.2f'):>12}{_fmt(r.p50_ms, '.0f'):>11}"
            f"{_fmt(r.p95_ms, '.0f'):>8}"
        )
    if args.skip_flow:
        return
    count = max(counts)
    print(f"\nlesson flow (MQTT + offer/answer + ICE/DTLS), {count} receiving rooms")
    for flow in await lesson_flow(count, capture):
        print(
            f"{flow.room:<16} live after {_fmt(flow.live_s, '.2f')} s, "
            f"first stamped frame after {_fmt(flow.first_frame_s, '.2f')} s"
        )


if __name__ == "__main__":
    asyncio.run(main())

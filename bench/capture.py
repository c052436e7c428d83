"""Capture benchmark: latency to consumers, drops with a slow consumer, CPU per stream.

Run from a checkout: ``.venv/bin/python bench/capture.py [--seconds 10]``.

For each source one hub runs with two consumers: a fast one (a stream would be here)
that records capture-to-consumer latency, from the frame's monotonic capture stamp to
the moment the consumer has it, and a slow one that "analyses" at 5 fps (an asyncio
sleep, so it costs no CPU itself). CPU is process CPU time over wall time while only
that hub runs, as a percentage of one core; it includes the event loop's share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from agent.capture import (  # noqa: E402
    AudioHub,
    DeviceState,
    FrameHub,
    open_audio_source,
    open_video_source,
)
from agent.capture.video import SyntheticVideoSource  # noqa: E402
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig  # noqa: E402

WIDTH, HEIGHT, FPS = 1280, 720, 30.0
SLOW_PERIOD_S = 0.2  # the slow consumer's 5 fps


@dataclass
class Row:
    source: str
    rate: float
    items: int
    p50_ms: float
    p95_ms: float
    fast_delivered: int
    fast_missed: int
    slow_delivered: int
    slow_missed: int
    cpu_percent: float


def make_clip(directory: Path, seconds: float) -> Path:
    """A 720p30 MPEG-4 clip of the synthetic pattern (OpenCV's wheels carry no H.264)."""
    path = directory / "bench-720p30.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    source = SyntheticVideoSource(WIDTH, HEIGHT, 10_000)  # unpaced enough to render fast
    source.open()
    for _ in range(int(seconds * FPS)):
        writer.write(source.read())
    writer.release()
    return path


def summarise(latencies_ns: list[int]) -> tuple[float, float]:
    if len(latencies_ns) < 2:
        return float("nan"), float("nan")
    ms = [value / 1e6 for value in latencies_ns]
    return statistics.median(ms), statistics.quantiles(ms, n=20)[18]


async def measure(
    label: str,
    hub: FrameHub | AudioHub,
    seconds: float,
    *,
    rate: Callable[[Any], float],
    items: Callable[[Any], int],
    missed: Callable[[Any], int],
) -> Row:
    """One hub with a fast and a slow consumer; ``rate``/``items``/``missed`` read the
    hub's and its consumers' stats (video skips frames, audio drops chunks)."""
    latencies: list[int] = []
    measuring = asyncio.Event()
    done = asyncio.Event()

    async def fast() -> None:
        with hub.subscribe("fast") as consumer:
            while not done.is_set():
                item = await consumer.get()
                if measuring.is_set():
                    latencies.append(time.monotonic_ns() - item.captured_ns)

    async def slow() -> None:
        # Video: always the latest frame. Audio: a 50-chunk queue read 1 chunk per 0.2 s.
        with hub.subscribe("slow") as consumer:
            while not done.is_set():
                await consumer.get()
                await asyncio.sleep(SLOW_PERIOD_S)

    runner = asyncio.create_task(hub.run(), name="hub")
    try:
        async with asyncio.timeout(15):
            await hub.wait_for_state(DeviceState.OK)
        async with asyncio.TaskGroup() as group:
            group.create_task(fast(), name="fast")
            group.create_task(slow(), name="slow")
            await asyncio.sleep(1.0)  # warm-up: caches, first decode, subscriptions
            before = hub.stats()
            cpu0, wall0 = time.process_time(), time.monotonic()
            measuring.set()
            await asyncio.sleep(seconds)
            cpu1, wall1 = time.process_time(), time.monotonic()
            after = hub.stats()
            done.set()
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    p50, p95 = summarise(latencies)
    start = {c.name: c for c in before.consumers}
    end = {c.name: c for c in after.consumers}
    return Row(
        label,
        rate(after),
        items(after) - items(before),
        p50,
        p95,
        end["fast"].delivered - start["fast"].delivered,
        missed(end["fast"]) - missed(start["fast"]),
        end["slow"].delivered - start["slow"].delivered,
        missed(end["slow"]) - missed(start["slow"]),
        100.0 * (cpu1 - cpu0) / (wall1 - wall0),
    )


async def run_video(label: str, cfg: VideoConfig, seconds: float) -> Row:
    hub = FrameHub(open_video_source(cfg), CaptureConfig())
    return await measure(
        label,
        hub,
        seconds,
        rate=lambda s: s.fps,
        items=lambda s: s.frames_read,
        missed=lambda c: c.skipped,
    )


async def run_audio(label: str, cfg: AudioConfig, seconds: float) -> Row:
    hub = AudioHub(open_audio_source(cfg), CaptureConfig())
    return await measure(
        label,
        hub,
        seconds,
        rate=lambda s: s.chunks_per_s,
        items=lambda s: s.chunks_read,
        missed=lambda c: c.dropped,
    )


def print_table(rows: list[Row], seconds: float) -> None:
    header = (
        f"{'source':<34} {'rate/s':>6} {'items':>6} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'fast got/missed':>15} {'slow got/missed':>15} {'CPU %core':>9}"
    )
    print(f"\ncapture benchmark: {seconds:g} s per source, one hub at a time")
    print("latency: capture stamp (monotonic) -> fast consumer has the item")
    print("missed: frames skipped (video, latest-only) or chunks dropped (audio, queue full)\n")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.source:<34} {row.rate:>6.1f} {row.items:>6d} {row.p50_ms:>7.2f} "
            f"{row.p95_ms:>7.2f} {f'{row.fast_delivered}/{row.fast_missed}':>15} "
            f"{f'{row.slow_delivered}/{row.slow_missed}':>15} {row.cpu_percent:>9.1f}"
        )


async def main(seconds: float) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as tmp:
        clip = make_clip(Path(tmp), 4.0)
        video = {"width": WIDTH, "height": HEIGHT, "fps": FPS}
        rows.append(
            await run_video(
                "video synthetic 1280x720@30", VideoConfig(source="synthetic", **video), seconds
            )
        )
        rows.append(
            await run_video(
                "video file mp4v 1280x720@30",
                VideoConfig(source="file", path=clip, **video),
                seconds,
            )
        )
    rows.append(
        await run_audio(
            "audio synthetic 48 kHz mono 20 ms",
            AudioConfig(source="synthetic", sample_rate=48000, channels=1, frame_ms=20),
            seconds,
        )
    )
    print_table(rows, seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per source")
    args = parser.parse_args()
    asyncio.run(main(args.seconds))

"""Health-reporting benchmark: CPU share of one core and message size.

Run from a checkout: ``.venv/bin/python bench/health.py [--seconds 20] [--with-10s]``.

One process starts Mosquitto (a child process, so its CPU is not counted), an
`MqttLink` to it, and then alternates phases of equal length:

- *baseline*: the link alone (keepalive, event loop idle);
- *reporter @ 1 s*: a real `HealthReporter` publishing every second: system metrics
  (psutil in a worker thread, adjtimex), the process figures, the capture sections of
  a typical room (static here: the capture hubs' own cost is in bench/capture.py),
  the alert engine, the outbox (SQLite, opened) and a QoS 0 publish;
- with ``--with-10s``: a longer baseline and reporter @ 10 s pair, measured directly.

CPU is process CPU time (all threads) over wall time, as a percentage of one core; the
reporter's share is its phase minus the baseline beside it. The 10 s figure is also
extrapolated from the 1 s run (CPU per message / 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from agent.broker import MosquittoBroker  # noqa: E402
from agent.capture.hub import _mean_luma  # noqa: E402
from agent.config.models import BrokerConfig, HealthConfig, IdentityConfig  # noqa: E402
from agent.health import AlertEngine, HealthReporter, ProcessMetrics, SystemMetrics  # noqa: E402
from agent.sync import MqttLink, Outbox, ReliablePublisher  # noqa: E402

TARGET_PERCENT = 0.5  # of one core, at the default 10 s interval


@dataclass
class Phase:
    label: str
    interval_s: float | None
    wall_s: float
    cpu_s: float
    messages: int

    @property
    def percent(self) -> float:
        return 100.0 * self.cpu_s / self.wall_s


def typical_sections(process: ProcessMetrics) -> dict[str, Any]:
    """What a room's runtime hands the reporter (shape of the real hubs' stats)."""
    now = time.time()
    return {
        "capture": {
            "video": {
                "source": "camera /dev/video0",
                "state": "ok",
                "reason": "frames arriving",
                "since": round(now - 3600, 3),
                "state_for_s": 3600.0,
                "mode": "1280x720@30 MJPG",
                "fps": 30.0,
                "frames_read": 108000,
                "read_errors": 0,
                "reopen_attempts": 0,
                "mean_luma": 112.4,
                "consumers": {
                    "stream": {"delivered": 107990, "skipped": 10},
                    "sensing": {"delivered": 18000, "skipped": 90000},
                },
            },
            "audio": {
                "source": "microphone 'USB Speakerphone'",
                "state": "ok",
                "reason": "audio arriving",
                "since": round(now - 3600, 3),
                "state_for_s": 3600.0,
                "format": "48000 Hz 1 ch 20 ms",
                "chunks_per_s": 50.0,
                "chunks_read": 180000,
                "read_errors": 0,
                "reopen_attempts": 0,
                "level_dbfs": -31.2,
                "peak_dbfs": -8.4,
                "clipping": False,
                "consumers": {"stream": {"delivered": 180000, "dropped": 0, "queued": 0}},
            },
        },
        "agent": process.section(
            version="0.1.0",
            profile="intel-n100-uvc1080",
            services={"capture.video": "running", "capture.audio": "running", "mqtt": "running"},
        ),
    }


async def measure(
    label: str,
    seconds: float,
    *,
    link: MqttLink,
    interval_s: float | None,
    state_dir: Path,
    publisher: ReliablePublisher,
) -> tuple[Phase, HealthReporter | None]:
    reporter: HealthReporter | None = None
    task: asyncio.Task[None] | None = None
    if interval_s is not None:
        config = HealthConfig(interval_s=interval_s)
        process = ProcessMetrics()
        reporter = HealthReporter(
            link,
            config,
            lambda: typical_sections(process),
            system=SystemMetrics(state_dir),
            alerts=AlertEngine(config),
            publisher=publisher,
        )
    published = link.stats().published
    wall, cpu = time.perf_counter(), time.process_time()
    if reporter is not None:
        task = asyncio.create_task(reporter.run(), name=f"bench-{label}")
    try:
        await asyncio.sleep(seconds)
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    return Phase(label, interval_s, wall, cpu, link.stats().published - published), reporter


def micro(label: str, fn: Any, repeat: int = 200) -> tuple[str, float]:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return label, (time.perf_counter() - started) / repeat * 1e6


async def main(seconds: float, with_10s: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-health-") as tmp:
        state_dir = Path(tmp)
        async with MosquittoBroker() as broker:
            link = MqttLink(
                BrokerConfig(url=broker.url, topic_prefix="bench"),
                IdentityConfig(site="bench", room="room1"),
                software_version="0.1.0",
                profile_name="bench",
            )
            link_task = asyncio.create_task(link.run(), name="bench-link")
            publisher = ReliablePublisher(link, Outbox(state_dir / "outbox.db"))
            publisher_task = asyncio.create_task(publisher.run(), name="bench-outbox")
            try:
                await link.wait_connected(10)
                await asyncio.sleep(1.0)  # let the connect settle before measuring
                phases: list[Phase] = []
                base1, _ = await measure(
                    "baseline",
                    seconds,
                    link=link,
                    interval_s=None,
                    state_dir=state_dir,
                    publisher=publisher,
                )
                at1, reporter = await measure(
                    "reporter @ 1 s",
                    seconds,
                    link=link,
                    interval_s=1.0,
                    state_dir=state_dir,
                    publisher=publisher,
                )
                phases += [base1, at1]
                if with_10s:
                    long_s = max(60.0, 3 * seconds)
                    base10, _ = await measure(
                        "baseline (long)",
                        long_s,
                        link=link,
                        interval_s=None,
                        state_dir=state_dir,
                        publisher=publisher,
                    )
                    at10, _ = await measure(
                        "reporter @ 10 s",
                        long_s,
                        link=link,
                        interval_s=10.0,
                        state_dir=state_dir,
                        publisher=publisher,
                    )
                    phases += [base10, at10]
            finally:
                for task in (publisher_task, link_task):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    assert reporter is not None
    last = reporter.last_message
    assert last is not None
    size = len(json.dumps(last, separators=(",", ":")).encode())

    print(f"{'phase':<18} {'wall s':>7} {'CPU s':>7} {'CPU % core':>11} {'msgs':>5}")
    for phase in phases:
        print(
            f"{phase.label:<18} {phase.wall_s:7.1f} {phase.cpu_s:7.3f} "
            f"{phase.percent:11.3f} {phase.messages:5d}"
        )
    share_1s = at1.percent - base1.percent
    per_message_ms = 1000.0 * (at1.cpu_s - base1.cpu_s * at1.wall_s / base1.wall_s)
    per_message_ms /= max(1, at1.messages)
    extrapolated_10s = per_message_ms / 1000.0 / 10.0 * 100.0
    print()
    print(f"reporter share at 1 s interval:       {share_1s:.3f} % of one core")
    print(f"CPU per health message:               {per_message_ms:.2f} ms")
    print(f"extrapolated at 10 s interval:        {extrapolated_10s:.3f} % of one core")
    if with_10s:
        measured = phases[3].percent - phases[2].percent
        print(f"measured at 10 s interval:            {measured:.3f} % of one core")
    verdict = "OK" if extrapolated_10s <= TARGET_PERCENT else "OVER"
    print(f"target at 10 s:                       <= {TARGET_PERCENT} % ({verdict})")
    print(f"health message size:                  {size} bytes (compact JSON)")

    image = np.random.default_rng(1).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    sub = np.ascontiguousarray(image[::8, ::8])
    metrics = SystemMetrics(ROOT)
    engine = AlertEngine(HealthConfig())
    print()
    print(f"{'step':<40} {'us':>9}")
    for label, us in (
        micro("SystemMetrics.sample() (blocking part)", metrics.sample, 50),
        micro("mean luma of a 720p subsample (stats)", lambda: _mean_luma(sub)),
        micro("AlertEngine.evaluate(message)", lambda: engine.evaluate(last)),
        micro("json.dumps(message)", lambda: json.dumps(last, separators=(",", ":"))),
    ):
        print(f"{label:<40} {us:9.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument(
        "--with-10s", action="store_true", help="also measure the 10 s interval (>= 2 min)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.with_10s))

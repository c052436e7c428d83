"""Pushed-profile benchmark: time from ``profile push`` to ``applied`` for 10, 50, 100 devices.

Run from a checkout: ``.venv/bin/python bench/profiles.py [--devices 10 50 100]
[--pushes 3] [--workers 4]``.

For each fleet size the bench starts a Mosquitto on 127.0.0.1 (`MosquittoBroker`,
anonymous clients) and spreads N simulated devices (school1.room001 ...) over
``--workers`` child processes, several devices per process on one event loop. Each
device runs the real device side of pushed profiles: its own `MqttLink` (its own
connection and client id), a `ProfileBook` in its own state directory on disk (atomic
writes with fsync, as on a device), a `ProfileManager` and a `ProfileListener`. Its
`ConfigTarget` does the daemon's config work: ``load_with`` is the real
``ConfigSources(...).load()`` of the device's site file plus the pushed layers (every
layer validated); ``apply_config`` runs the daemon's media-file preflight and the real
composition ``plan`` from the running config to the new one, then takes the new config
as running; it does not build or restart services (no capture, stream or health reporter
runs here), and ``check_applied`` has nothing to check (None).

The bench then signs a ``school:school1`` profile (a ``health.interval_s`` change, with
a fresh version each time) and publishes it retained as IT does (``profile push``: QoS 1,
on the school's desired topic), and measures, for every device, the time from just before
that publish to the arrival of the device's retained ``config/reported`` saying the
school layer is ``applied`` at that version (one subscriber on ``+/+/config/reported``).
CPU per apply is the worker processes' CPU time (psutil, all threads) from the publish
until the last device answered, divided by the number of devices; the broker's CPU is
shown beside it. At the end each worker says which interval every device now runs on and
what the plans were, and the bench checks them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from agent.broker import MosquittoBroker  # noqa: E402
from agent.config import AgentConfig, ConfigSources, IdentityConfig, Layer, LoadedConfig  # noqa: E402
from agent.config.models import BrokerConfig  # noqa: E402
from agent.contracts import FleetTopics  # noqa: E402
from agent.runtime.composition import PARTS, Inputs, plan  # noqa: E402
from agent.runtime.daemon import preflight_media_files  # noqa: E402
from agent.runtime.profiles import (  # noqa: E402
    ApplyResult,
    Outcome,
    ProfileListener,
    ProfileManager,
    open_book,
)
from agent.sync import MqttLink, Scope, generate_key, public_key_text, sign  # noqa: E402

SCRIPT = Path(__file__).resolve()
PREFIX = "bench"
SITE = "school1"
LAYER = f"school:{SITE}"
TARGET_P95_S = 3.0  # the target for 100 devices
BASE_INTERVAL_S = 10.0
READY_TIMEOUT_S = 120.0
PUSH_TIMEOUT_S = 60.0
SETTLE_S = 1.0  # quiet time between pushes (and before the idle measurement)
IDLE_S = 2.0
STOP_TIMEOUT_S = 20.0


@dataclass
class Meter:
    """Where a worker's time goes (wall time, all of it on the devices' event loop)."""

    fsyncs: int = 0
    fsync_s: float = 0.0
    loads: int = 0
    load_s: float = 0.0

    def since(self, start: Meter) -> dict[str, float]:
        return {
            "fsyncs": self.fsyncs - start.fsyncs,
            "fsync_s": self.fsync_s - start.fsync_s,
            "loads": self.loads - start.loads,
            "load_s": self.load_s - start.load_s,
        }


METER = Meter()


def count_fsyncs() -> None:
    """Time every fsync of this process (the ProfileBook's durable writes): a wrapper
    around ``os.fsync`` that changes nothing else."""
    real = os.fsync

    def timed(fd: Any) -> None:
        started = time.perf_counter()
        try:
            real(fd)
        finally:
            METER.fsyncs += 1
            METER.fsync_s += time.perf_counter() - started

    os.fsync = timed


# -- the device side (in the worker processes) -----------------------------------------------


class _InPlace:
    """Stands for a running part that takes a new config in place (what `plan` asks of a
    part before it plans a reconfigure rather than a restart); it does nothing else."""

    def reconfigure(self, config: AgentConfig) -> None:
        del config


class PlanningTarget:
    """A `ConfigTarget` that does the daemon's config work without running services:
    full loads (every layer validated), the media-file preflight, the composition plan."""

    def __init__(self, sources: ConfigSources, loaded: LoadedConfig, broker_url: str) -> None:
        self.sources = sources
        self.loaded = loaded
        self.broker_url = broker_url
        self.objects: dict[str, Any] = {part.name: _InPlace() for part in PARTS}
        self.plans: list[str] = []

    def load_with(self, pushed: tuple[Layer, ...]) -> LoadedConfig:
        started = time.perf_counter()
        try:
            return dataclasses.replace(self.sources, pushed=pushed).load()
        finally:
            METER.loads += 1
            METER.load_s += time.perf_counter() - started

    def set_pushed(self, pushed: tuple[Layer, ...]) -> None:
        self.sources = dataclasses.replace(self.sources, pushed=pushed)

    async def apply_config(
        self, candidate: LoadedConfig, *, origin: str, lesson_may_delay: bool = True
    ) -> ApplyResult:
        del origin, lesson_may_delay  # no lesson runs here
        await asyncio.to_thread(preflight_media_files, candidate.config)
        running = Inputs(self.loaded.config, self.broker_url, self.loaded.profile)
        new = Inputs(candidate.config, self.broker_url, candidate.profile)
        change = plan(running, new, self.objects, PARTS)
        for name in change.reconfigures:
            self.objects[name].reconfigure(candidate.config)
        self.loaded = candidate
        self.plans.append(change.describe())
        return ApplyResult(Outcome.APPLIED, "", tuple(change.restarts), tuple(change.actions))

    async def check_applied(self, result: ApplyResult, timeout_s: float) -> str | None:
        del result, timeout_s  # nothing was restarted: nothing to check
        return None


@dataclass
class Device:
    device_id: str
    link: MqttLink
    target: PlanningTarget
    manager: ProfileManager
    listener: ProfileListener


def make_device(room: str, spec: dict[str, Any], directory: Path) -> Device:
    directory.mkdir(parents=True)
    site = {
        "identity": {"site": SITE, "room": room, "display_name": f"Bench {room}"},
        "hardware": {"profile": "virtual"},
        "broker": {"url": spec["url"], "topic_prefix": PREFIX, "keepalive_s": 30},
        "health": {"interval_s": BASE_INTERVAL_S},
        "supervisor": {"state_dir": str(directory / "state")},
        "profiles": {"trusted_keys": spec["keys"]},
    }
    site_file = directory / "site.yaml"
    site_file.write_text(yaml.safe_dump(site), encoding="utf-8")
    sources = ConfigSources((site_file,))
    loaded = sources.load()
    book = open_book(loaded)
    target = PlanningTarget(sources, loaded, spec["url"])
    config = loaded.config
    link = MqttLink(
        config.broker,
        config.identity,
        software_version="bench",
        profile_name=loaded.profile,
    )
    manager = ProfileManager(book, target, FleetTopics(PREFIX))
    return Device(config.identity.device_id, link, target, manager, ProfileListener(link, manager))


async def wait_for_eof() -> None:
    """Until the parent closes our stdin (or dies): the signal to stop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while await reader.read(4096):
            pass
    finally:
        transport.close()


async def worker(spec: dict[str, Any]) -> None:
    count_fsyncs()
    base = Path(spec["dir"])
    devices = [make_device(room, spec, base / room) for room in spec["rooms"]]
    tasks: list[asyncio.Task[None]] = []
    for device in devices:
        tasks.append(asyncio.create_task(device.link.run(), name=f"{device.device_id}:link"))
        tasks.append(asyncio.create_task(device.manager.run(), name=f"{device.device_id}:mgr"))
        tasks.append(
            asyncio.create_task(device.listener.run(), name=f"{device.device_id}:listener")
        )
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await asyncio.gather(*(d.link.wait_connected() for d in devices))
        start = dataclasses.replace(METER)
        print("ready", flush=True)
        await wait_for_eof()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    devices_summary = {
        d.device_id: {
            "interval_s": d.target.loaded.config.health.interval_s,
            "plans": sorted(set(d.target.plans)),
            "applied": d.manager.applied_count,
            "dropped": d.manager.dropped_messages,
        }
        for d in devices
    }
    summary = {"devices": devices_summary, "meter": METER.since(start)}
    print(json.dumps(summary), flush=True)


# -- IT's side and the measurement (in the bench process) --------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class Push:
    devices: int
    version: int
    latencies_s: list[float]
    failures: dict[str, str]
    missing: int
    wall_s: float
    worker_cpu_s: float
    idle_cpu_s: float  # what the workers would have spent idle over the same wall time
    broker_cpu_s: float

    @property
    def cpu_ms_per_apply(self) -> float:
        return 1000.0 * self.worker_cpu_s / self.devices

    @property
    def net_cpu_ms_per_apply(self) -> float:
        return 1000.0 * (self.worker_cpu_s - self.idle_cpu_s) / self.devices


@dataclass
class Reports:
    """Every device's latest ``config/reported``, and the answers to the current push."""

    version: int | None = None
    started: float = 0.0
    seen: set[str] = field(default_factory=set)
    latencies: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, device: str, document: dict[str, Any], received: float) -> None:
        self.seen.add(device)
        entry = (document.get("layers") or {}).get(LAYER) or {}
        if self.version is None or entry.get("version") != self.version:
            return
        state = entry.get("state")
        if state == "applied" and device not in self.latencies:
            self.latencies[device] = received - self.started
        elif state in ("rejected", "rolled-back"):
            self.failures[device] = f"{state}: {entry.get('code')}: {entry.get('reason')}"
        self.changed.set()

    def begin(self, version: int) -> None:
        self.version = version
        self.latencies = {}
        self.failures = {}
        self.started = time.monotonic()


async def watch(link: MqttLink, reports: Reports) -> None:
    topic_filter = f"{PREFIX}/+/+/config/reported"
    async with link.subscribe(topic_filter, qos=1, maxsize=100000) as messages:
        async for message in messages:
            received = time.monotonic()
            with contextlib.suppress(ValueError):
                document = message.json()
                if isinstance(document, dict) and isinstance(document.get("device"), str):
                    reports.take(document["device"], document, received)
            reports.changed.set()


async def until(reports: Reports, done: Any, within: float) -> bool:
    """Until ``done()`` holds; False after ``within`` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not done():
                reports.changed.clear()
                await reports.changed.wait()
            return True
    return False


def cpu_of(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


async def read_line(stream: asyncio.StreamReader, within: float) -> str:
    async with asyncio.timeout(within):
        return (await stream.readline()).decode().strip()


@dataclass
class Size:
    pushes: list[Push]
    devices: dict[str, Any]  # what each device runs on at the end (from the workers)
    meter: dict[str, float]  # the workers' meters over the pushes, summed

    @property
    def applies(self) -> int:
        return sum(int(state["applied"]) for state in self.devices.values())


async def measure_size(n: int, pushes: int, workers: int) -> Size:
    rooms = [f"room{i:03d}" for i in range(1, n + 1)]
    count = min(workers, n)
    shares = [rooms[i::count] for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="bench-profiles-") as tmp:
        it_dir = Path(tmp) / "it-keys"
        keys = [generate_key(it_dir) for _ in range(2)]
        pinned = [public_key_text(k.public) for k in keys]
        async with MosquittoBroker() as broker:
            assert broker.pid is not None
            broker_process = psutil.Process(broker.pid)
            it = MqttLink(
                BrokerConfig(url=broker.url, topic_prefix=PREFIX),
                IdentityConfig(site="it", room="bench-push"),
                software_version="bench",
                profile_name="it",
                announce=False,
            )
            reports = Reports()
            link_task = asyncio.create_task(it.run(), name="bench-it-link")
            watch_task: asyncio.Task[None] | None = None
            children: list[asyncio.subprocess.Process] = []
            final: dict[str, Any] = {}
            meter: dict[str, float] = {}
            try:
                await it.wait_connected(15)
                watch_task = asyncio.create_task(watch(it, reports), name="bench-watch")
                for index, share in enumerate(shares):
                    spec = {
                        "url": broker.url,
                        "keys": pinned,
                        "rooms": share,
                        "dir": str(Path(tmp) / f"worker{index}"),
                    }
                    children.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable,
                            str(SCRIPT),
                            "--worker",
                            json.dumps(spec),
                            stdin=asyncio.subprocess.PIPE,
                            stdout=asyncio.subprocess.PIPE,
                            cwd=ROOT,
                        )
                    )
                for child in children:
                    assert child.stdout is not None
                    line = await read_line(child.stdout, READY_TIMEOUT_S)
                    if line != "ready":
                        raise RuntimeError(f"a worker did not start (said {line!r})")
                devices = {f"{SITE}.{room}" for room in rooms}
                if not await until(reports, lambda: devices <= reports.seen, READY_TIMEOUT_S):
                    raise RuntimeError(f"{len(devices - reports.seen)} devices never reported")
                processes = [psutil.Process(child.pid) for child in children]
                await asyncio.sleep(SETTLE_S)
                cpu0, wall0 = cpu_of(processes), time.monotonic()
                await asyncio.sleep(IDLE_S)
                idle_rate = (cpu_of(processes) - cpu0) / (time.monotonic() - wall0)
                topic = FleetTopics(PREFIX).config_desired_for(LAYER)
                results = []
                for version in range(1, pushes + 1):
                    payload = f"health:\n  interval_s: {BASE_INTERVAL_S + version:g}\n"
                    envelope = sign(
                        payload.encode(),
                        payload_type="config",
                        scope=Scope.parse(LAYER),
                        version=version,
                        keys=[keys[0]],
                    )
                    cpu0, broker0 = cpu_of(processes), cpu_of([broker_process])
                    reports.begin(version)
                    await it.publish(topic, envelope.raw, qos=1, retain=True)
                    await until(
                        reports,
                        lambda: len(reports.latencies) + len(reports.failures) >= n,
                        PUSH_TIMEOUT_S,
                    )
                    wall = time.monotonic() - reports.started
                    cpu = cpu_of(processes) - cpu0
                    results.append(
                        Push(
                            devices=n,
                            version=version,
                            latencies_s=list(reports.latencies.values()),
                            failures=dict(reports.failures),
                            missing=n - len(reports.latencies) - len(reports.failures),
                            wall_s=wall,
                            worker_cpu_s=cpu,
                            idle_cpu_s=idle_rate * wall,
                            broker_cpu_s=cpu_of([broker_process]) - broker0,
                        )
                    )
                    await asyncio.sleep(SETTLE_S)
                for child in children:
                    assert child.stdin is not None
                    assert child.stdout is not None
                    child.stdin.close()
                    summary = json.loads(await read_line(child.stdout, STOP_TIMEOUT_S))
                    final.update(summary["devices"])
                    for key, value in summary["meter"].items():
                        meter[key] = meter.get(key, 0.0) + value
            finally:
                for child in children:
                    if child.stdin is not None and not child.stdin.is_closing():
                        child.stdin.close()
                for child in children:
                    try:
                        await asyncio.wait_for(child.wait(), STOP_TIMEOUT_S)
                    except TimeoutError:
                        child.kill()
                        await child.wait()
                tasks = [t for t in (watch_task, link_task) if t is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    return Size(results, final, meter)


def check_summary(n: int, pushes: int, summary: dict[str, Any]) -> list[str]:
    """What the devices say they run on after the last push: every one on its interval."""
    problems = []
    expected = BASE_INTERVAL_S + pushes
    if len(summary) != n:
        problems.append(f"{n - len(summary)} devices missing from the workers' summaries")
    for device, state in sorted(summary.items()):
        if state["interval_s"] != expected or state["applied"] != pushes:
            problems.append(
                f"{device}: health.interval_s {state['interval_s']} after {state['applied']} "
                f"applies (expected {expected} after {pushes})"
            )
    return problems


def table(results: list[Push]) -> str:
    lines = [
        f"{'devices':>7} {'push':>5} {'applied':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
        f"{'CPU ms/apply':>13} {'net of idle':>12} {'broker CPU ms':>14}"
    ]
    for r in results:
        values = r.latencies_s or [float("nan")]
        lines.append(
            f"{r.devices:>7} {'v' + str(r.version):>5} {len(r.latencies_s):>4}/{r.devices:<3} "
            f"{1000 * percentile(values, 0.5):>8.0f} {1000 * percentile(values, 0.95):>8.0f} "
            f"{1000 * max(values):>8.0f} {r.cpu_ms_per_apply:>13.1f} "
            f"{r.net_cpu_ms_per_apply:>12.1f} {1000 * r.broker_cpu_s:>14.0f}"
        )
    return "\n".join(lines)


async def main(sizes: list[int], pushes: int, workers: int) -> int:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"profile push -> applied: {pushes} pushes per size (versions 1..{pushes}, a school:"
        f"{SITE} health.interval_s change), devices spread over up to {workers} worker "
        f"processes (several per process, one event loop each); {psutil.cpu_count()} CPUs, "
        f"load average {load} (other work on this machine makes the figures noisy)"
    )
    print(
        "each device: its own MQTT connection, ProfileBook (state on disk, fsync), "
        "ProfileManager + ProfileListener; apply = full config load + preflight + "
        "composition plan; services are NOT restarted (none run here)"
    )
    results: list[Push] = []
    failed: list[str] = []
    for n in sizes:
        count = min(workers, n)
        per = f"{n // count}" + (f"-{n // count + 1}" if n % count else "")
        print(f"  {n} devices in {count} processes ({per} per process) ...", flush=True)
        size = await measure_size(n, pushes, workers)
        results.extend(size.pushes)
        for push in size.pushes:
            for device, why in sorted(push.failures.items()):
                failed.append(f"{n} devices, v{push.version}: {device} {why}")
            if push.missing:
                failed.append(f"{n} devices, v{push.version}: {push.missing} never answered")
        failed.extend(check_summary(n, pushes, size.devices))
        plans = sorted({p for state in size.devices.values() for p in state["plans"]})
        print(f"    composition plans on the devices: {'; '.join(plans) or 'none'}")
        applies = max(1, size.applies)
        print(
            f"    per apply, on the worker's event loop: config load "
            f"{1000 * size.meter['load_s'] / applies:.1f} ms ({size.meter['loads'] / applies:.0f} "
            f"load), {size.meter['fsyncs'] / applies:.0f} fsyncs taking "
            f"{1000 * size.meter['fsync_s'] / applies:.1f} ms (wall, includes waiting for a core)"
        )
    print()
    print(table(results))
    print(
        "\nlatency: just before the retained QoS 1 publish -> the device's retained "
        "config/reported says school layer applied at that version (one clock, this "
        "machine). CPU: the worker processes (all threads) from the publish to the last "
        "answer, per device; 'net of idle' subtracts their idle rate (keepalives, timers) "
        "over the same time."
    )
    largest = [r for r in results if r.devices == max(sizes)]
    pooled = [x for r in largest for x in r.latencies_s]
    if pooled:
        p95 = percentile(pooled, 0.95)
        verdict = "OK" if p95 <= TARGET_P95_S else "OVER"
        print(
            f"{max(sizes)} devices, all pushes pooled: p95 {1000 * p95:.0f} ms; target "
            f"<= {TARGET_P95_S * 1000:.0f} ms ({verdict})"
        )
    for line in failed:
        print(f"PROBLEM: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--pushes", type=int, default=3, help="pushes per size (versions 1..N)")
    parser.add_argument("--workers", type=int, default=4, help="device processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        asyncio.run(worker(json.loads(args.worker)))
        sys.exit(0)
    if min(args.devices) < 1 or args.pushes < 1 or args.workers < 1 or max(args.devices) > 999:
        parser.error("--devices 1..999, --pushes and --workers at least 1")
    sys.exit(asyncio.run(main(args.devices, args.pushes, args.workers)))

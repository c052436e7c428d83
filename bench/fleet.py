"""Fleet dashboard benchmark: update latency and the dashboard's CPU for 100 and 500 rooms.

Run from a checkout: ``.venv/bin/python bench/fleet.py [--quick] [--rooms 100 500]
[--interval 10] [--seconds 25]``.

For each fleet size the bench starts a local Mosquitto (`MosquittoBroker`), the real
dashboard server in a child process (``run_dashboard``: the same code as
``classroom-agent dashboard``), and, in this process, N simulated rooms (`SimFleet`,
50 rooms per MQTT connection) publishing retained births, realistic health messages
(docs/contracts.md, with live lessons' stream sections and occasional alerts) every
``--interval`` seconds, phases spread over the interval as a real fleet's are, plus one
WebSocket client like the page. After a warm-up it measures, for ``--seconds``:

- *model latency*: health ``ts`` (stamped just before the publish) to the moment the
  dashboard's fleet model applied it (its ``/api/stats`` ``health_delay_ms``);
- *WebSocket latency*: ``ts`` to the moment the client received the update carrying
  it (includes the coalescing of pushes, at most 4 per second);
- *dashboard CPU*: the child's CPU time (all threads) over wall time, % of one core.

Everything runs on one machine, so ``ts`` and the receive times share a clock. The
default interval is the agents' real 10 s (no time compression); ``--quick`` compresses
time to a 2 s interval (5x the message rate) and measures 8 s per size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from agent.broker import MosquittoBroker  # noqa: E402
from agent.broker.embedded import free_loopback_port  # noqa: E402
from agent.config.models import BrokerConfig  # noqa: E402
from agent.dashboard import dashboard_config, run_dashboard  # noqa: E402
from agent.testkit import SimFleet, fleet_layout  # noqa: E402

SCRIPT = Path(__file__).resolve()
ROOMS_PER_CONNECTION = 50
WARMUP_S = 3.0


@dataclass
class Result:
    rooms: int
    interval_s: float
    seconds: float
    health_per_s: float
    model_median_ms: float | None
    model_p95_ms: float | None
    ws_median_ms: float | None
    ws_p95_ms: float | None
    ws_samples: int
    pushes_per_s: float
    push_kb_per_s: float
    cpu_percent: float
    rss_mb: float


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class WsClient:
    """A page-like WebSocket client: records ``now - health.ts`` for each new health."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.recording = False
        self.messages = 0
        self._seen: dict[str, float] = {}

    async def run(self, url: str) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            async for message in ws:
                received = time.time()
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                self.messages += 1
                data = json.loads(message.data)
                for room in data.get("rooms", ()):
                    health = room.get("health")
                    if not health:
                        continue
                    ts = health["ts"]
                    if self._seen.get(room["id"]) == ts:
                        continue
                    self._seen[room["id"]] = ts
                    if self.recording and data["type"] == "update":
                        self.latencies_ms.append((received - ts) * 1000.0)


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        response.raise_for_status()
        data: dict[str, Any] = await response.json()
        return data


async def wait_for_dashboard(session: aiohttp.ClientSession, base: str, rooms: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            fleet = await get_json(session, f"{base}/api/fleet")
            if fleet["counts"]["rooms"] >= rooms:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the dashboard did not list {rooms} rooms within 60 s")


async def wait_for_link(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            stats = await get_json(session, f"{base}/api/stats")
            if stats["link"]["connected"]:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError("the dashboard did not connect to the broker within 30 s")


async def measure(rooms: int, interval_s: float, seconds: float) -> Result:
    async with MosquittoBroker() as broker:
        port = free_loopback_port()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--dashboard-child",
            json.dumps({"url": broker.url, "port": port, "interval": interval_s}),
            cwd=ROOT,
        )
        base = f"http://127.0.0.1:{port}"
        specs, groups = fleet_layout(rooms)
        fleet = SimFleet(
            BrokerConfig(url=broker.url),
            specs,
            groups,
            interval_s=interval_s,
            connections=max(1, rooms // ROOMS_PER_CONNECTION),
            alert_rate=0.005,
        )
        client = WsClient()
        try:
            async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tasks:
                await wait_for_link(session, base)
                fleet_task = tasks.create_task(fleet.run(), name="bench-fleet")
                await wait_for_dashboard(session, base, rooms)
                ws_task = tasks.create_task(client.run(f"{base}/api/ws"), name="bench-ws")
                await asyncio.sleep(WARMUP_S)
                process = psutil.Process(child.pid)
                before = await get_json(session, f"{base}/api/stats")
                cpu0, wall0, sent0 = (
                    sum(process.cpu_times()[:2]),
                    time.monotonic(),
                    fleet.health_sent,
                )
                client.recording = True
                await asyncio.sleep(seconds)
                client.recording = False
                cpu1, wall1, sent1 = (
                    sum(process.cpu_times()[:2]),
                    time.monotonic(),
                    fleet.health_sent,
                )
                rss_mb = process.memory_info().rss / 2**20
                after = await get_json(session, f"{base}/api/stats")
                ws_task.cancel()
                fleet_task.cancel()
        finally:
            if child.returncode is None:
                child.terminate()
                try:
                    await asyncio.wait_for(child.wait(), 10)
                except TimeoutError:
                    child.kill()
                    await child.wait()
    wall = wall1 - wall0
    delays = after["model"]["health_delay_ms"]
    server0, server1 = before["server"], after["server"]
    return Result(
        rooms=rooms,
        interval_s=interval_s,
        seconds=wall,
        health_per_s=(sent1 - sent0) / wall,
        model_median_ms=delays["median"],
        model_p95_ms=delays["p95"],
        ws_median_ms=statistics.median(client.latencies_ms) if client.latencies_ms else None,
        ws_p95_ms=percentile(client.latencies_ms, 0.95),
        ws_samples=len(client.latencies_ms),
        pushes_per_s=(server1["pushes"] - server0["pushes"]) / wall,
        push_kb_per_s=(server1["push_bytes"] - server0["push_bytes"]) / wall / 1024,
        cpu_percent=100.0 * (cpu1 - cpu0) / wall,
        rss_mb=rss_mb,
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[Result]) -> str:
    lines = [
        f"{'rooms':>6} {'health/s':>9} {'model ms med/p95':>18} {'WS ms med/p95':>16} "
        f"{'samples':>8} {'pushes/s':>9} {'push KB/s':>10} {'CPU % core':>11} {'RSS MB':>7}"
    ]
    for r in results:
        lines.append(
            f"{r.rooms:>6} {r.health_per_s:>9.1f} "
            f"{fmt(r.model_median_ms) + ' / ' + fmt(r.model_p95_ms):>18} "
            f"{fmt(r.ws_median_ms, 0) + ' / ' + fmt(r.ws_p95_ms, 0):>16} "
            f"{r.ws_samples:>8} {r.pushes_per_s:>9.2f} {r.push_kb_per_s:>10.1f} "
            f"{r.cpu_percent:>11.2f} {r.rss_mb:>7.0f}"
        )
    return "\n".join(lines)


async def main(rooms: list[int], interval_s: float, seconds: float) -> None:
    print(
        f"dashboard benchmark: health every {interval_s:g} s per room"
        f"{' (real agents: 10 s)' if interval_s != 10 else ' (the agents default)'}, "
        f"{seconds:g} s measured per fleet size after {WARMUP_S:g} s warm-up; "
        f"{psutil.cpu_count()} CPUs"
    )
    results = []
    for n in rooms:
        print(f"  {n} rooms ...", flush=True)
        results.append(await measure(n, interval_s, seconds))
    print()
    print(table(results))
    print(
        "\nmodel: health ts -> applied in the dashboard's fleet model; WS: health ts -> "
        "received by a WebSocket client (coalesced pushes, <= 4/s); CPU: the dashboard "
        "process (aiohttp + MQTT + model), % of one core."
    )


def dashboard_child(spec: str) -> int:
    """The dashboard process: the real server, as ``classroom-agent dashboard`` runs it."""
    values = json.loads(spec)
    config = dashboard_config(
        broker={"url": values["url"]},
        port=values["port"],
        health_interval_s=values["interval"],
    )
    return run_dashboard(config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--interval", type=float, help="health interval (default 10, quick 2)")
    parser.add_argument("--seconds", type=float, help="measured seconds per size (default 25)")
    parser.add_argument("--quick", action="store_true", help="2 s interval, 8 s per size")
    parser.add_argument("--dashboard-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dashboard_child:
        sys.exit(dashboard_child(args.dashboard_child))
    interval = args.interval or (2.0 if args.quick else 10.0)
    seconds = args.seconds or (8.0 if args.quick else 25.0)
    asyncio.run(main(args.rooms, interval, seconds))

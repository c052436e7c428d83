"""A rural room's network goes away for 30 s mid-lesson and comes back.

The receiving room's agent runs inside a network namespace of its own, joined to the
main room (root namespace) by a veth pair; Mosquitto listens on the host side of the
pair. Pulling the host-side link down cuts the room off from both the broker and the
main room; when it comes back, the room must be live again within 5 s (measured from
the link coming up to the main room announcing it joined). ``tc netem`` does not exist
on these machines: a link that is down is the fault we can make.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import BrokerUnderTest, observing, unique_prefix
from tests.test_daemon import Daemon
from tests.test_stream_rejoin import (
    GROUP,
    MAIN,
    ROOM2,
    go_live,
    joined,
    newer,
    room_config,
    stream_state,
)

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

OUTAGE_S = 30.0
REJOIN_TARGET_S = 5.0


@dataclass(frozen=True)
class Netns:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A namespace and a veth pair on a subnet of their own (10.77.N.0/24, N random),
    removed in teardown whatever happened."""
    tag = uuid.uuid4().hex[:6]
    subnet = random.randint(1, 254)
    ns = Netns(f"cea-{tag}", f"ceah{tag}", f"10.77.{subnet}.1", f"10.77.{subnet}.2")
    peer = f"cean{tag}"
    try:
        _ip("netns", "add", ns.name)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/24", "dev", peer)
        _ip("-n", ns.name, "link", "set", peer, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


class NsDaemon(Daemon):
    """``classroom-agent run`` inside a network namespace (``ip netns exec``, which
    execs: the pid is the agent's)."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], namespace: str) -> None:
        super().__init__(tmp_path, config, launcher=("ip", "netns", "exec", namespace))
        self.namespace = namespace


@pytest.mark.timeout(180)
async def test_room_behind_a_link_down_for_30_s_is_live_again_within_5_s(
    netns: Netns, tmp_path: Path
) -> None:
    broker = BrokerUnderTest(tmp_path=tmp_path, prefix=unique_prefix(), host=netns.host_ip)
    main: Daemon | None = None
    room2: Daemon | None = None
    try:
        await broker.start()
        prefix = broker.prefix
        lesson_topic = f"{prefix}/lesson/{GROUP}"
        health = f"{prefix}/school1/room2/health"
        room2_state = f"{prefix}/school1/room2/state"
        (tmp_path / "main").mkdir()
        (tmp_path / "room2").mkdir()
        main = Daemon(
            tmp_path / "main",
            room_config(broker.url, prefix, MAIN, tmp_path / "s-main", ice=netns.host_ip),
        )
        room2 = NsDaemon(
            tmp_path / "room2",
            room_config(broker.url, prefix, ROOM2, tmp_path / "s-room2", ice=netns.ns_ip),
            netns.name,
        )
        async with observing(broker, f"{prefix}/#") as it:
            await main.start()
            await room2.start()
            await go_live(it, prefix)

            before = len(it.received(lesson_topic))
            cut = time.monotonic()
            _ip("link", "set", netns.host_if, "down")
            try:
                # The broker's keepalive (1.5 x 5 s) publishes the room's Last Will and
                # the main room drops it from the lesson.
                will = await it.wait_for(
                    room2_state, lambda m: m.json()["status"] == "offline", within=OUTAGE_S
                )
                offline_after_s = time.monotonic() - cut
                assert will.json()["reason"] == "connection lost"
                await it.wait_for(
                    lesson_topic,
                    lambda m: ROOM2 not in joined(m) and newer(it, lesson_topic, m, before),
                    within=OUTAGE_S,
                )
                dropped_after_s = time.monotonic() - cut
                remaining = OUTAGE_S - (time.monotonic() - cut)
                await asyncio.sleep(max(0.0, remaining))  # the outage itself, not a wait
            finally:
                _ip("link", "set", netns.host_if, "up")
            up = time.monotonic()
            seen = len(it.received(lesson_topic))
            seen_states = len(it.received(room2_state))
            await it.wait_for(
                room2_state,
                lambda m: m.json()["status"] == "online" and newer(it, room2_state, m, seen_states),
                within=60,
            )
            broker_back_s = time.monotonic() - up
            await it.wait_for(
                lesson_topic,
                lambda m: ROOM2 in joined(m) and newer(it, lesson_topic, m, seen),
                within=60,
            )
            live_again_s = time.monotonic() - up
            log.info(
                "link down %.0f s: room offline (Last Will) after %.1f s, dropped from the "
                "lesson after %.1f s; link up -> broker again %.2f s -> live %.2f s",
                OUTAGE_S,
                offline_after_s,
                dropped_after_s,
                broker_back_s,
                live_again_s,
            )
            seen_health = len(it.received(health))
            await it.wait_for(
                health,
                lambda m: stream_state(m) == "live" and newer(it, health, m, seen_health),
                within=30,
            )
            # During the outage the room kept trying and said so; nothing crashed.
            assert room2.process is not None
            assert room2.process.returncode is None
            assert "lesson: reconnecting" in room2.log()
            assert live_again_s < REJOIN_TARGET_S, f"live again after {live_again_s:.2f} s"

            end = f"{prefix}/school1/room1/cmd/lesson-end"
            await it.publish(end, json.dumps({"id": "end-1", "args": {}}))
            assert (await it.wait_for(f"{end}/result", within=20)).json()["ok"]
            for daemon in (main, room2):
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGTERM)
                assert await daemon.wait_exit() == 0
        for daemon in (main, room2):
            assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        for daemon in (main, room2):
            if daemon is not None:
                await daemon.close()
        await broker.close()

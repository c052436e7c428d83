"""Store-and-forward: the SQLite outbox (order, bound, corruption, kill -9) and the
ReliablePublisher against a real Mosquitto (queued while down, delivered in order and
flagged delayed when back, direct when up, ACL refusals dropped)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.sync import Delivery, Outbox, ReliablePublisher, Topics
from tests.brokers import (
    DEVICE_1,
    DEVICE_2,
    BrokerUnderTest,
    eventually,
    make_link,
    observing,
    running,
    serving,
)

REPO = Path(__file__).resolve().parents[1]
ALERT_SCHEMA = json.loads((REPO / "schemas" / "alert.v1.json").read_text())


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def contents(outbox: Outbox) -> list[tuple[str, Any]]:
    return [(row.kind, json.loads(row.payload)["n"]) for row in await outbox.peek(1000)]


# -- the outbox alone ------------------------------------------------------------------------


async def test_outbox_keeps_order_across_reopen_and_deletes_only_what_it_is_told(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "outbox.db"  # the directory is created
    outbox = Outbox(path)
    assert await outbox.open() == 0
    ids = [await outbox.append("t/a", body(n=i), "alert" if i % 2 else "event") for i in range(5)]
    assert ids == sorted(ids)
    await outbox.set_state("alerts.active", "[1]")
    await outbox.close()

    again = Outbox(path)
    assert await again.open() == 5
    assert again.queued == 5
    assert [n for _, n in await contents(again)] == [0, 1, 2, 3, 4]
    assert await again.get_state("alerts.active") == "[1]"
    assert await again.get_state("nothing") is None
    assert await again.delete([ids[0], ids[2], 999_999]) == 2
    assert [n for _, n in await contents(again)] == [1, 3, 4]
    # ids are never reused (AUTOINCREMENT): a new row sorts after the survivors
    new_id = await again.append("t/a", body(n=5), "telemetry")
    assert new_id > ids[-1]
    assert again.queued == 4
    assert await again.integrity_check() == "ok"
    await again.close()
    with pytest.raises(ValueError, match="kind"):
        await again.append("t/a", b"{}", "bogus")  # type: ignore[arg-type]
    await again.close()


async def test_bound_drops_telemetry_oldest_first_then_events_never_alerts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / "o.db", max_rows=3)
    try:
        for n, kind in enumerate(["event", "telemetry", "alert", "telemetry"]):
            await outbox.append("t", body(n=n), kind)  # type: ignore[arg-type]
        # 4 > 3: the oldest telemetry (n=1) goes, even though the event (n=0) is older
        assert await contents(outbox) == [("event", 0), ("alert", 2), ("telemetry", 3)]
        await outbox.append("t", body(n=4), "event")
        assert await contents(outbox) == [("event", 0), ("alert", 2), ("event", 4)]
        await outbox.append("t", body(n=5), "alert")  # no telemetry left: oldest event
        assert await contents(outbox) == [("alert", 2), ("event", 4), ("alert", 5)]
        await outbox.append("t", body(n=6), "alert")
        assert await contents(outbox) == [("alert", 2), ("alert", 5), ("alert", 6)]
        assert outbox.dropped == 4

        # All alerts: the store grows past its bound (with a warning), losing none.
        with caplog.at_level(logging.WARNING, logger="agent.sync.store"):
            await outbox.append("t", body(n=7), "alert")
        assert "only alerts are left" in caplog.text
        await outbox.append("t", body(n=8), "telemetry")  # the only droppable row: itself
        assert await contents(outbox) == [("alert", n) for n in (2, 5, 6, 7)]
        assert outbox.queued == 4
        assert outbox.dropped == 5
    finally:
        await outbox.close()


async def test_a_corrupt_file_is_moved_aside_and_the_outbox_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    outbox = Outbox(path)
    try:
        with caplog.at_level(logging.ERROR, logger="agent.sync.store"):
            assert await outbox.open() == 0
        assert "is damaged" in caplog.text
        aside = await asyncio.to_thread(lambda: list(tmp_path.glob("outbox.db.corrupt-*")))
        assert len(aside) == 1
        await outbox.append("t", body(n=1), "alert")
        assert await contents(outbox) == [("alert", 1)]
    finally:
        await outbox.close()


CHILD = r"""
import asyncio, json, sys
from pathlib import Path
from agent.sync.store import Outbox

async def main(path, topic):
    outbox = Outbox(Path(path), max_rows=1_000_000)
    await outbox.open()
    n = 0
    while True:
        kind = "alert" if n % 3 == 0 else "event"
        await outbox.append(topic, json.dumps({"n": n, "kind": kind}).encode(), kind)
        print(n, flush=True)  # acknowledged: committed and synced
        n += 1

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_kill_9_mid_stream_loses_nothing_acknowledged(
    tmp_path: Path, mosquitto: BrokerUnderTest
) -> None:
    path = tmp_path / "outbox.db"
    topic = Topics(mosquitto.prefix, "school1", "room1").alert
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        topic,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acked = -1
    try:
        async with asyncio.timeout(60):
            while acked < 150:
                line = await child.stdout.readline()
                assert line, "the writer exited early"
                acked = int(line)
        child.send_signal(signal.SIGKILL)  # mid-stream: it is appending as fast as it can
        rest = await child.stdout.read()  # what it acknowledged before it died
        for line in rest.split():
            acked = int(line)
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        await child.wait()
    # -9; or 255 where asyncio's child watcher found the child already reaped ("Unknown
    # child process", seen once in CI on a machine busy with other test runs): either
    # way it died mid-stream by our SIGKILL, and what follows checks what it left.
    assert child.returncode in (-signal.SIGKILL, 255), child.returncode

    outbox = Outbox(path, max_rows=1_000_000)
    assert await outbox.open() >= acked + 1
    assert await outbox.integrity_check() == "ok"
    stored = [json.loads(row.payload)["n"] for row in await outbox.peek(100_000)]
    # every acknowledged message, in order; at most the one in flight beyond it
    assert stored[: acked + 1] == list(range(acked + 1))
    assert len(stored) - (acked + 1) in (0, 1)

    link = make_link(mosquitto, DEVICE_1)
    publisher = ReliablePublisher(link, outbox)
    async with observing(mosquitto, topic) as observer:
        async with running(link), serving(publisher):
            await eventually(
                lambda: len(observer.received(topic)) >= len(stored), 30, "the backlog"
            )
            await eventually(lambda: publisher.queued == 0, 10, "an empty outbox")
        received = [m.json() for m in observer.received(topic)]
    assert [m["n"] for m in received] == stored
    assert all(m["delayed"] is True for m in received)
    assert publisher.delivered == len(stored)


# -- the publisher against a broker --------------------------------------------------------


def alert(n: int, **extra: Any) -> dict[str, Any]:
    message = {
        "v": 1,
        "id": f"00000000-0000-4000-8000-{n:012d}",
        "device": DEVICE_1,
        "rule": "camera_lost",
        "severity": "critical",
        "state": "raised",
        "since": 1.0,
        "at": 2.0,
        "message": f"alert {n}",
        "delayed": False,
        "details": {},
    }
    message.update(extra)
    return message


async def test_queued_while_down_delivered_in_order_flagged_delayed_then_direct(
    tmp_path: Path, mosquitto: BrokerUnderTest
) -> None:
    link = make_link(mosquitto, DEVICE_1)
    topic = link.topics.alert
    publisher = ReliablePublisher(link, Outbox(tmp_path / "outbox.db"))
    async with observing(mosquitto, topic) as observer, serving(publisher):
        # The link is not running: everything goes to disk, in order.
        for n in range(5):
            assert await publisher.send(topic, alert(n), "alert") is Delivery.QUEUED
        assert publisher.queued == 5
        async with running(link):
            await eventually(lambda: len(observer.received(topic)) >= 5, 15, "the backlog")
            await eventually(lambda: publisher.queued == 0, 10, "an empty outbox")
            # Nothing queued and the link up: straight out, not delayed.
            assert await publisher.send(topic, alert(5), "alert") is Delivery.SENT
            await eventually(lambda: len(observer.received(topic)) >= 6, 10, "the direct one")
            await asyncio.sleep(0.2)  # nothing more arrives
        received = [m.json() for m in observer.received(topic)]
    assert [m["message"] for m in received] == [f"alert {n}" for n in range(6)]
    assert [m["delayed"] for m in received] == [True] * 5 + [False]
    for message in received:
        jsonschema.validate(message, ALERT_SCHEMA)
    assert publisher.stats() == {
        "queued": 0,
        "sent_direct": 1,
        "delivered_later": 5,
        "rejected": 0,
        "dropped": 0,
        "lost": 0,
    }


async def test_a_refused_message_is_dropped_and_does_not_block_the_queue(
    tmp_path: Path, mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    link = make_link(mosquitto, DEVICE_1)  # held to the fleet ACL
    mine = link.topics.alert
    foreign = Topics(mosquitto.prefix, *DEVICE_2.split(".")).alert
    publisher = ReliablePublisher(link, Outbox(tmp_path / "outbox.db"))
    async with observing(mosquitto, f"{mosquitto.prefix}/#") as observer, serving(publisher):
        await publisher.send(mine, alert(1), "alert")
        await publisher.send(foreign, alert(2), "alert")  # the ACL says no
        await publisher.send(mine, alert(3), "alert")
        with caplog.at_level(logging.ERROR, logger="agent.sync.store"):
            async with running(link):
                await eventually(lambda: publisher.queued == 0, 15, "an empty outbox")
                await eventually(lambda: len(observer.received(mine)) >= 2, 10, "both alerts")
                # Up and empty: a refused direct publish is reported, not stored.
                assert await publisher.send(foreign, alert(4), "alert") is Delivery.REJECTED
                assert publisher.queued == 0
    assert [m.json()["message"] for m in observer.received(mine)] == ["alert 1", "alert 3"]
    assert observer.received(foreign) == []
    assert publisher.rejected == 2
    assert "Not authorized" in caplog.text

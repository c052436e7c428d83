"""sd_notify and the watchdog, against a datagram socket the test owns (no systemd needed).

A receiver thread reads the socket and stamps each message on arrival, so a test can
block the event loop and still see when pings stopped. Deadlines are generous: the
machines running this are shared and noisy; only gaps and counts are asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.runtime.sdnotify import Notifier, WatchdogService, watchdog_loop

DEADLINE_S = 10.0


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


@dataclass
class NotifyReceiver:
    """The systemd side: a bound AF_UNIX datagram socket and what arrived on it."""

    sock: socket.socket
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self.lock:
                self.messages.append(Received(time.monotonic(), fields))

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def with_key(self, key: str) -> list[Received]:
        return [m for m in self.snapshot() if key in m.fields]

    def pings(self) -> list[float]:
        return [m.at for m in self.with_key("WATCHDOG")]


def _wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline:g} s waiting for {what}")
        time.sleep(0.01)


async def _await(condition: Callable[[], bool], what: str, deadline: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline:g} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def _receiver(address: str | bytes) -> Iterator[NotifyReceiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    receiver = NotifyReceiver(sock)
    thread = threading.Thread(target=receiver.serve, name="notify-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.stop.set()
        thread.join(timeout=5)
        sock.close()


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer for long test names.
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="sdn-") as short:
        yield Path(short)


@pytest.fixture
def receiver(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    path = socket_dir / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with _receiver(str(path)) as rx:
        yield rx


def _watchdog_env(monkeypatch: pytest.MonkeyPatch, usec: int = 200_000) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


def test_ready_status_stopping_reach_the_socket(receiver: NotifyReceiver) -> None:
    notifier = Notifier.from_environment()
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("running as room-1")
    assert notifier.reloading()
    assert notifier.ready(status="reloaded")
    assert notifier.extend_timeout(2.5)
    assert notifier.stopping()
    _wait_for(lambda: len(receiver.snapshot()) >= 6, "six notifications")
    notifier.close()

    got = [m.fields for m in receiver.snapshot()]
    assert got[0] == {"READY": "1"}
    assert got[1] == {"STATUS": "running as room-1"}
    assert got[2]["RELOADING"] == "1"
    assert int(got[2]["MONOTONIC_USEC"]) > 0
    assert got[3] == {"READY": "1", "STATUS": "reloaded"}
    assert got[4] == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert got[5] == {"STOPPING": "1"}


def test_status_cannot_smuggle_another_assignment(receiver: NotifyReceiver) -> None:
    notifier = Notifier.from_environment()
    notifier.status("camera lost\nREADY=1")
    _wait_for(lambda: len(receiver.snapshot()) >= 1, "the status message")
    notifier.close()
    assert receiver.snapshot()[0].fields == {"STATUS": "camera lost READY=1"}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"classroom-agent-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    with _receiver(b"\0" + name.encode()) as rx:
        notifier = Notifier.from_environment()
        assert notifier.ready()
        _wait_for(lambda: len(rx.snapshot()) >= 1, "READY=1 on the abstract socket")
        notifier.close()
    assert rx.snapshot()[0].fields == {"READY": "1"}


async def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    # Without a watchdog the service idles until cancelled, and cancels promptly.
    task = asyncio.create_task(WatchdogService(notifier, lambda: True).run())
    await asyncio.sleep(0.05)
    assert not task.done()
    await _stop(task)
    assert task.cancelled()


def test_environment_is_not_inherited_by_children(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _watchdog_env(monkeypatch)
    notifier = Notifier.from_environment()
    assert notifier.watchdog_interval() == pytest.approx(0.2)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ


def test_watchdog_interval_needs_our_pid(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier.from_environment().watchdog_interval() is None

    monkeypatch.setenv("NOTIFY_SOCKET", str(receiver.sock.getsockname()))
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # from_environment() removed it
    assert Notifier.from_environment().watchdog_interval() == 30.0

    monkeypatch.setenv("NOTIFY_SOCKET", str(receiver.sock.getsockname()))
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert Notifier.from_environment().watchdog_interval() is None


def test_send_failure_is_logged_once_and_never_raised(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(socket_dir / "nobody-listens.sock"))
    notifier = Notifier.from_environment()
    with caplog.at_level(logging.WARNING, logger="agent.runtime.sdnotify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.status("still nobody")
    notifier.close()
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]


async def test_watchdog_pings_repeatedly(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _watchdog_env(monkeypatch)  # 200 ms timeout: a ping every 100 ms
    notifier = Notifier.from_environment()
    service = WatchdogService(notifier, lambda: True)
    assert service.name == "watchdog"
    task = asyncio.create_task(service.run(), name="watchdog-under-test")
    try:
        await _await(lambda: len(receiver.pings()) >= 5, "five watchdog pings")
    finally:
        await _stop(task)
        notifier.close()
    assert all(m.fields == {"WATCHDOG": "1"} for m in receiver.with_key("WATCHDOG"))


async def test_blocked_event_loop_stops_the_pings(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _watchdog_env(monkeypatch)
    notifier = Notifier.from_environment()
    task = asyncio.create_task(watchdog_loop(notifier, lambda: True), name="watchdog-under-test")
    try:
        await _await(lambda: len(receiver.pings()) >= 3, "pings before the block")
        blocked_at = time.monotonic()
        # Wedge the event loop on purpose: nothing on it runs, the pings included.
        time.sleep(1.0)  # noqa: ASYNC251
        blocked_until = time.monotonic()
        await _await(
            lambda: sum(at > blocked_until for at in receiver.pings()) >= 3,
            "pings after the block",
        )
    finally:
        await _stop(task)
        notifier.close()
    pings = receiver.pings()
    # No ping arrived while the loop was blocked (the receiver thread kept running). The
    # margins leave room for a receiver thread that a busy machine schedules late.
    during = [at for at in pings if blocked_at + 0.3 < at < blocked_until - 0.05]
    assert not during, f"{len(during)} ping(s) while the loop was blocked"
    longest_gap = max(b - a for a, b in itertools.pairwise(pings))
    assert longest_gap > 0.6, f"longest gap between pings {longest_gap:.2f} s"


async def test_unhealthy_supervisor_withholds_pings(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _watchdog_env(monkeypatch)
    notifier = Notifier.from_environment()
    healthy = True
    task = asyncio.create_task(
        WatchdogService(notifier, lambda: healthy).run(), name="watchdog-under-test"
    )
    try:
        await _await(lambda: len(receiver.pings()) >= 3, "pings while healthy")
        healthy = False
        await asyncio.sleep(0.3)  # a ping already in flight may still land
        withheld_from = len(receiver.pings())
        await asyncio.sleep(1.0)  # ten ping periods
        assert len(receiver.pings()) == withheld_from, "pinged while unhealthy"
        healthy = True
        await _await(lambda: len(receiver.pings()) >= withheld_from + 2, "pings resumed")
    finally:
        await _stop(task)
        notifier.close()


async def test_health_check_that_raises_counts_as_unhealthy(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _watchdog_env(monkeypatch)
    notifier = Notifier.from_environment()

    def broken() -> bool:
        raise RuntimeError("health check bug")

    task = asyncio.create_task(watchdog_loop(notifier, broken), name="watchdog-under-test")
    try:
        await asyncio.sleep(0.6)
        assert not task.done(), "the watchdog service must keep running"
        assert receiver.pings() == []
    finally:
        await _stop(task)
        notifier.close()

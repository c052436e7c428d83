"""Commands over MQTT against a real Mosquitto held to the fleet ACL.

The device runs `CommandService` on its own `MqttLink` (user = the device, so the
broker's ACL applies); IT is a plain paho client logged in as the ``admin`` user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.sync import Message, MqttLink, PublishRejected, Topics
from agent.sync.commands import (
    CommandError,
    CommandService,
    callable_handler,
    check_args,
    ping_handler,
)
from tests.brokers import (
    ADMIN,
    DEVICE_1,
    BrokerUnderTest,
    MqttObserver,
    make_link,
    observing,
    running,
    serving,
)


@contextlib.asynccontextmanager
async def device_and_it(
    broker: BrokerUnderTest, service_setup: Any = None
) -> AsyncIterator[tuple[MqttLink, CommandService, MqttObserver]]:
    link = make_link(broker, user=DEVICE_1)
    service = CommandService(link, default_timeout_s=10)
    service.register(
        "ping", ping_handler(link, version="9.9.9", started_monotonic=time.monotonic() - 5)
    )
    if service_setup is not None:
        service_setup(service)
    async with (
        observing(broker, f"{link.topics.base}/cmd/+/result", user=ADMIN) as it,
        running(link),
        serving(service),
    ):
        await listening(it, link)
        yield link, service, it


async def listening(it: MqttObserver, link: MqttLink) -> None:
    """The service subscribes in its own task: a ping answered means it is listening."""
    deadline = time.monotonic() + 15
    while True:
        await send(it, link, "ping", {"id": "warm-up"})
        try:
            await result_for(it, link, "ping", "warm-up", within=0.5)
        except pytest.fail.Exception:
            assert time.monotonic() < deadline, "the command service never answered"
            continue
        return


async def send(
    it: MqttObserver, link: MqttLink, name: str, request: Any, *, retain: bool = False
) -> None:
    payload = request if isinstance(request, str | bytes) else json.dumps(request)
    await it.publish(link.topics.cmd(name), payload, retain=retain)


async def result_for(
    it: MqttObserver, link: MqttLink, name: str, request_id: str | None, within: float = 15.0
) -> dict[str, Any]:
    def matches(message: Message) -> bool:
        data = message.json()
        return isinstance(data, dict) and data.get("id") == request_id

    message = await it.wait_for(link.topics.cmd_result(name), matches, within=within)
    data: dict[str, Any] = message.json()
    return data


# -- unit: argument checking -------------------------------------------------------------


def test_check_args_names_the_problem() -> None:
    spec = {"duration_s": float, "camera": bool, "name": str}
    assert check_args("x", None, spec) == {}
    assert check_args("x", {"duration_s": 2}, spec) == {"duration_s": 2}  # JSON int is a number
    with pytest.raises(CommandError, match=r"'args' must be an object, got a list"):
        check_args("x", [1], spec)
    with pytest.raises(CommandError, match=r"argument 'duration_s' must be a number, got a string"):
        check_args("x", {"duration_s": "2"}, spec)
    with pytest.raises(CommandError, match=r"'camera' must be true or false, got a number"):
        check_args("x", {"camera": 1}, spec)
    with pytest.raises(CommandError, match=r"unknown argument\(s\) durration_s; allowed: camera"):
        check_args("x", {"durration_s": 1}, spec)
    with pytest.raises(CommandError, match=r"missing argument\(s\) name"):
        check_args("x", {}, spec, frozenset({"name"}))
    with pytest.raises(CommandError, match=r"unknown argument"):
        check_args("x", {"a": 1}, {})
    assert check_args("x", {"anything": [1]}, None) == {"anything": [1]}


def test_register_refuses_bad_names_and_duplicates(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto, user=DEVICE_1)
    service = CommandService(link)

    async def handler(args: dict[str, Any]) -> None:
        return None

    service.register("restart-capture", handler)
    with pytest.raises(ValueError, match=r"already registered"):
        service.register("restart-capture", handler)
    with pytest.raises(ValueError, match=r"not a valid topic level"):
        service.register("Bad/Name", handler)
    assert service.commands == ["restart-capture"]


# -- over the broker ---------------------------------------------------------------------


async def test_ping_round_trip_per_contract(mosquitto: BrokerUnderTest) -> None:
    async with device_and_it(mosquitto) as (link, _service, it):
        await send(it, link, "ping", {"id": "req-1", "args": {}})
        result = await result_for(it, link, "ping", "req-1")
    assert result["v"] == 1
    assert result["command"] == "ping"
    assert result["ok"] is True
    assert result["error"] is None
    assert result["result"]["version"] == "9.9.9"
    assert result["result"]["uptime_s"] >= 5
    assert result["result"]["seq"] == link.seq >= 1
    assert result["result"]["device"] == DEVICE_1
    assert abs(result["at"] - time.time()) < 60


async def test_bad_requests_get_clear_errors_and_the_service_survives(
    mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    def setup(service: CommandService) -> None:
        async def wait(args: dict[str, Any]) -> dict[str, Any]:
            return {"waited": args.get("seconds", 0)}

        service.register("wait", wait, args={"seconds": float})

    async with device_and_it(mosquitto, setup) as (link, service, it):

        async def error_of(name: str, request: Any, request_id: str | None) -> str:
            it.messages.clear()
            await send(it, link, name, request)
            result = await result_for(it, link, name, request_id)
            assert result["ok"] is False
            assert result["result"] is None
            assert result["command"] == name
            error: str = result["error"]
            return error

        assert "request is not JSON" in await error_of("ping", "this is not json", None)
        assert "request must be a JSON object, got a list" in await error_of("ping", "[1]", None)
        assert 'request has no "id"' in await error_of("ping", {"args": {}}, None)
        assert "65 characters; at most 64" in await error_of("ping", {"id": "x" * 65}, None)
        assert '"id" must be a non-empty string' in await error_of("ping", {"id": 7}, None)
        assert "unknown command 'reboot'; this device knows: ping, wait" in await error_of(
            "reboot", {"id": "r1"}, "r1"
        )
        assert "argument 'seconds' must be a number, got a string" in await error_of(
            "wait", {"id": "w1", "args": {"seconds": "two"}}, "w1"
        )
        assert "'args' must be an object, got a list" in await error_of(
            "wait", {"id": "w2", "args": [2]}, "w2"
        )
        assert "unknown request field(s) argz" in await error_of(
            "wait", {"id": "w3", "argz": {}}, "w3"
        )
        big = {"id": "big", "args": {"pad": "x" * 20_000}}
        assert "the limit is 16384" in await error_of("ping", big, None)

        # ... and the device still answers.
        await send(it, link, "wait", {"id": "w4", "args": {"seconds": 1}})
        good = await result_for(it, link, "wait", "w4")
        assert good["ok"] is True
        assert good["result"] == {"waited": 1}
        assert link.is_connected
        assert service.rejected == 10
    assert any("refused command reboot (id r1)" in r.getMessage() for r in caplog.records)


async def test_retained_command_is_refused_not_run(mosquitto: BrokerUnderTest) -> None:
    ran = asyncio.Event()

    def setup(service: CommandService) -> None:
        async def restart(args: dict[str, Any]) -> None:
            ran.set()

        service.register("restart-capture", restart)

    link = make_link(mosquitto, user=DEVICE_1)
    async with observing(mosquitto, user=ADMIN) as it:
        # Left retained by mistake: it would run at every reconnect of the device.
        await send(it, link, "restart-capture", {"id": "stale"}, retain=True)
    async with device_and_it(mosquitto, setup) as (link, _service, it):
        # The warm-up ping proved the subscription (and so the retained copy) is there.
        result = await result_for(it, link, "restart-capture", "stale")
    assert "retained command refused" in result["error"]
    assert not ran.is_set()


async def test_slow_command_does_not_block_others_and_is_not_run_twice(
    mosquitto: BrokerUnderTest,
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    runs = 0

    def setup(service: CommandService) -> None:
        async def slow(args: dict[str, Any]) -> dict[str, Any]:
            nonlocal runs
            runs += 1
            started.set()
            await release.wait()
            return {"done": True}

        service.register("selftest", slow, args={})

    async with device_and_it(mosquitto, setup) as (link, _service, it):
        await send(it, link, "selftest", {"id": "s1"})
        await asyncio.wait_for(started.wait(), 15)
        await send(it, link, "selftest", {"id": "s2"})
        busy = await result_for(it, link, "selftest", "s2")
        assert busy["ok"] is False
        assert "selftest is already running" in busy["error"]

        await send(it, link, "ping", {"id": "p1"})
        assert (await result_for(it, link, "ping", "p1"))["ok"] is True
        assert not it.received(link.topics.cmd_result("selftest"))[1:]  # s1 still running

        release.set()
        first = await result_for(it, link, "selftest", "s1")
        assert first["ok"] is True
        assert first["result"] == {"done": True}
        assert runs == 1


async def test_handler_failures_become_results(mosquitto: BrokerUnderTest) -> None:
    def setup(service: CommandService) -> None:
        async def refuse(args: dict[str, Any]) -> None:
            raise CommandError("camera is busy in a lesson; try after class")

        async def crash(args: dict[str, Any]) -> None:
            raise RuntimeError("boom")

        async def hang(args: dict[str, Any]) -> None:
            await asyncio.sleep(60)

        async def not_json(args: dict[str, Any]) -> dict[str, Any]:
            return {"value": float("nan")}

        async def restart() -> dict[str, Any]:
            return {"restarted": ["capture.video", "capture.audio"]}

        service.register("refuse", refuse)
        service.register("crash", crash)
        service.register("hang", hang, timeout_s=0.3)
        service.register("not-json", not_json)
        service.register("restart-capture", callable_handler(restart), args={})

    async with device_and_it(mosquitto, setup) as (link, _service, it):
        for name in ("refuse", "crash", "hang", "not-json", "restart-capture"):
            await send(it, link, name, {"id": f"id-{name}"})
        refused = await result_for(it, link, "refuse", "id-refuse")
        crashed = await result_for(it, link, "crash", "id-crash")
        hung = await result_for(it, link, "hang", "id-hang")
        bad = await result_for(it, link, "not-json", "id-not-json")
        restarted = await result_for(it, link, "restart-capture", "id-restart-capture")
    assert refused["error"] == "camera is busy in a lesson; try after class"
    assert crashed["error"] == "crash failed: internal error (RuntimeError: boom)"
    assert hung["error"] == "hang timed out after 0.3 s"
    assert "not JSON" in bad["error"]
    assert restarted["ok"] is True
    assert restarted["result"] == {"restarted": ["capture.video", "capture.audio"]}
    assert all(not r["ok"] for r in (refused, crashed, hung, bad))


async def test_cancelling_the_service_cancels_running_commands(
    mosquitto: BrokerUnderTest,
) -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()
    link = make_link(mosquitto, user=DEVICE_1)
    service = CommandService(link)

    async def slow(args: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    service.register("slow", slow)
    async with running(link), observing(mosquitto, user=ADMIN) as it:
        task = asyncio.create_task(service.run(), name="test-commands")
        try:
            deadline = time.monotonic() + 15
            while not started.is_set():  # retry until the subscription is in place
                assert time.monotonic() < deadline, "the command never started"
                await send(it, link, "slow", {"id": "s"})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(started.wait(), 0.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert cancelled.is_set()


async def test_only_it_may_send_commands(mosquitto: BrokerUnderTest) -> None:
    """The broker ACL is the authorisation: a device cannot command another room."""
    link = make_link(mosquitto, user=DEVICE_1)
    room2 = Topics(mosquitto.prefix, "school1", "room2")
    request = {"id": "evil", "args": {}}
    async with running(link):
        with pytest.raises(PublishRejected) as caught:
            await link.publish(room2.cmd("restart-capture"), request, qos=1)
        assert caught.value.reason_code == 0x87
        with pytest.raises(PublishRejected):  # not even to itself: commands are IT's
            await link.publish(link.topics.cmd("ping"), request, qos=1)
        with pytest.raises(PublishRejected):  # nor fake another room's results
            await link.publish(room2.cmd_result("ping"), {"id": "x", "ok": True}, qos=1)
        await link.publish(link.topics.cmd_result("ping"), {"id": "x", "ok": True}, qos=1)

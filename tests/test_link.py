"""MqttLink against a real Mosquitto: birth/will/shutdown, reconnects, ACL, auth, TLS."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.backoff import backoff_delay
from agent.broker import MosquittoBroker
from agent.config.models import BrokerConfig, IdentityConfig
from agent.sync import LinkAuthError, LinkConfigError, LinkDown, MqttLink, PublishRejected, Topics
from agent.sync.messages import encode_payload
from tests.brokers import (
    ADMIN,
    DEVICE_1,
    DEVICE_2,
    BrokerUnderTest,
    eventually,
    first,
    make_link,
    observing,
    running,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _state(link: MqttLink) -> str:
    return link.topics.state


# -- pure functions ---------------------------------------------------------------------


def test_backoff_delay_is_jittered_and_capped() -> None:
    rng = random.Random(1234)
    for attempt in range(12):
        cap = min(60.0, 1.0 * 2**attempt)
        samples = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= cap for s in samples)
        # full jitter: spread over the whole window, not clustered at the cap
        assert min(samples) < 0.1 * cap
        assert max(samples) > 0.9 * cap
    assert backoff_delay(10_000, 1.0, 60.0, rng) <= 60.0  # no overflow for huge attempts
    # two devices with different seeds do not wait the same time (no lockstep)
    a = [backoff_delay(5, 1.0, 60.0, random.Random(1)) for _ in range(1)]
    b = [backoff_delay(5, 1.0, 60.0, random.Random(2)) for _ in range(1)]
    assert a != b
    # a seeded RNG is reproducible
    assert backoff_delay(3, 0.5, 4.0, random.Random(7)) == backoff_delay(
        3, 0.5, 4.0, random.Random(7)
    )


def test_topics_layout() -> None:
    topics = Topics("edu", "school1", "room1")
    assert topics.state == "edu/school1/room1/state"
    assert topics.health == "edu/school1/room1/health"
    assert topics.alert == "edu/school1/room1/alert"
    assert topics.sensing == "edu/school1/room1/sensing"
    assert topics.config_desired == "edu/school1/room1/config/desired"
    assert topics.config_reported == "edu/school1/room1/config/reported"
    assert topics.cmd("purge") == "edu/school1/room1/cmd/purge"
    assert topics.cmd_result("purge") == "edu/school1/room1/cmd/purge/result"
    assert topics.lesson("music") == "edu/lesson/music"
    assert topics.rtc("school1.room1", "school2.room9") == "edu/rtc/school1.room1/school2.room9"
    assert topics.rtc_inbox == "edu/rtc/+/school1.room1"
    with pytest.raises(ValueError, match=r"reserved"):
        Topics("edu", "lesson", "room1")
    with pytest.raises(ValueError, match=r"command name"):
        topics.cmd("a/b")
    with pytest.raises(ValueError, match=r"site\.room"):
        topics.rtc("school1/room1", "x.y")


def test_encode_payload() -> None:
    assert encode_payload({"b": 1, "a": "é"}) == ('{"b":1,"a":"é"}'.encode(), True)
    assert encode_payload("hi") == (b"hi", False)
    assert encode_payload(b"\x00") == (b"\x00", False)
    with pytest.raises(TypeError, match=r"JSON"):
        encode_payload({"x": object()})


def test_reserved_site_is_a_config_error() -> None:
    with pytest.raises(LinkConfigError, match=r"reserved"):
        MqttLink(
            BrokerConfig(url="mqtt://127.0.0.1:1"),
            # the config layer rejects it too; the link must not rely on that
            IdentityConfig.model_construct(site="rtc", room="r1", groups=[]),
            software_version="x",
            profile_name="y",
        )
    with pytest.raises(LinkConfigError, match=r"broker\.url is empty"):
        MqttLink(
            BrokerConfig(),
            IdentityConfig(site="s", room="r"),
            software_version="x",
            profile_name="y",
        )


# -- state: birth, will, shutdown -------------------------------------------------------


async def test_birth_is_retained_and_seen_by_a_plain_client(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)
    async with running(link):
        assert link.is_connected
        # a client that subscribes afterwards gets the retained birth
        async with observing(mosquitto, _state(link)) as observer:
            message = await observer.wait_for(_state(link))
    assert message.retain
    birth = message.json()
    assert birth["status"] == "online"
    assert birth["device"] == DEVICE_1
    assert (birth["site"], birth["room"]) == ("school1", "room1")
    assert birth["version"] == "0.0.0-test"
    assert birth["profile"] == "test-kit"
    assert birth["seq"] == 1
    assert birth["boot_time"].endswith("Z")
    assert birth["connected_at"].endswith("Z")


async def test_graceful_shutdown_publishes_offline_promptly(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)
    async with observing(mosquitto, _state(link)) as observer:
        task = asyncio.create_task(link.run(), name="link-under-test")
        await first(link.wait_connected())
        await observer.wait_for(_state(link), lambda m: m.json()["status"] == "online")
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0
        offline = await observer.wait_for(_state(link), lambda m: m.json()["status"] == "offline")
    body = offline.json()
    assert body["reason"] == "shutdown"
    assert body["seq"] == 1
    assert not link.is_connected
    # retained: a newcomer sees the device offline, and no will replaced it
    async with observing(mosquitto, _state(link)) as late:
        retained = await late.wait_for(_state(link))
    assert retained.retain
    assert retained.json()["reason"] == "shutdown"
    # DISCONNECT was sent (Mosquitto says "closed its connection" for a bare socket close)
    assert f"Client {DEVICE_1} disconnected." in mosquitto.log_tail(50)


CHILD_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from agent.config.models import BrokerConfig, IdentityConfig
    from agent.sync import MqttLink

    async def main():
        link = MqttLink(
            BrokerConfig(url=sys.argv[1], topic_prefix=sys.argv[2], keepalive_s=5),
            IdentityConfig(site="school1", room="room1"),
            software_version="child", profile_name="test-kit",
        )
        task = asyncio.create_task(link.run())
        await link.wait_connected(10)
        print(json.dumps({"seq": link.seq}), flush=True)
        await task

    asyncio.run(main())
    """
)


async def test_last_will_arrives_when_the_agent_is_killed(mosquitto: BrokerUnderTest) -> None:
    topics = Topics(mosquitto.prefix, "school1", "room1")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD_SCRIPT,
        mosquitto.url,
        mosquitto.prefix,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await first(child.stdout.readline(), within=20)
        seq = json.loads(line)["seq"]
        async with observing(mosquitto, topics.state) as observer:
            await observer.wait_for(topics.state, lambda m: m.json()["status"] == "online")
            child.send_signal(signal.SIGKILL)
            await child.wait()
            will = await observer.wait_for(
                topics.state, lambda m: m.json()["status"] == "offline", within=5
            )
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    body = will.json()
    assert body["reason"] == "connection lost"
    assert body["seq"] == seq
    assert body["device"] == DEVICE_1
    async with observing(mosquitto, topics.state) as late:
        retained = await late.wait_for(topics.state)
    assert retained.retain
    assert retained.json()["reason"] == "connection lost"


# -- reconnects -------------------------------------------------------------------------


async def test_broker_restart_reconnects_resubscribes_and_seq_grows(
    mosquitto: BrokerUnderTest,
) -> None:
    link = make_link(mosquitto)
    command = link.topics.cmd("ping")
    async with running(link), link.subscribe(link.topics.cmd_filter) as commands:
        assert link.seq == 1
        await mosquitto.kill()  # a crash, no goodbye
        await eventually(lambda: not link.is_connected, what="link to notice the crash")
        await mosquitto.start()  # same port
        await first(link.wait_connected())
        assert link.seq >= 2
        async with observing(mosquitto, _state(link)) as observer:
            birth = await observer.wait_for(_state(link))
            assert birth.json()["seq"] == link.seq
            await observer.publish(command, "after restart")
            message = await first(commands.get())
        stats = link.stats()
    assert message.topic == command
    assert message.payload == b"after restart"
    assert stats.connects == 2
    assert stats.disconnects == 1
    # The loss is recorded; a reconnect attempt made while the broker was still down
    # may have replaced it with "unreachable" (which attempt wins is a race).
    assert stats.last_error is not None
    assert stats.last_error.startswith(("lost", "unreachable"))


async def test_link_started_before_the_broker_connects_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = BrokerUnderTest(tmp_path=tmp_path, prefix="tlate")
    link = MqttLink(
        broker.broker_config(None, reconnect_min_s=0.01, reconnect_max_s=0.05),
        broker.identity(),
        software_version="x",
        profile_name="y",
    )
    caplog.set_level(logging.WARNING, logger="agent.sync.link")
    try:
        async with running(link, connect=False):
            await eventually(lambda: link.stats().connect_attempts >= 5, what="retries")
            assert not link.is_connected
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
            await broker.start()
            await first(link.wait_connected())
    finally:
        await broker.close()


# -- publish / subscribe ----------------------------------------------------------------


async def test_publish_subscribe_round_trip_with_dict_payload(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)
    async with running(link), observing(mosquitto, link.topics.health) as observer:
        await link.publish(link.topics.health, {"cpu": 12.5, "camera": "ok"}, qos=1)
        seen = await observer.wait_for(link.topics.health)
        assert json.loads(seen.payload) == {"cpu": 12.5, "camera": "ok"}
        assert seen.payload == b'{"cpu":12.5,"camera":"ok"}'  # compact

        lesson = link.topics.lesson("music")
        async with link.subscribe(lesson) as announcements:
            await link.publish(lesson, {"lesson": "L1", "main": DEVICE_1}, qos=1, retain=True)
            message = await first(announcements.get())
        assert message.json() == {"lesson": "L1", "main": DEVICE_1}
        assert message.qos == 1
        stats = link.stats()
        assert stats.publish_rtt_ms is not None
        assert stats.publish_rtt_ms >= 0
        assert stats.received >= 1


async def test_overlapping_subscriptions_each_get_the_message_once(
    mosquitto: BrokerUnderTest,
) -> None:
    link = make_link(mosquitto)
    topic = link.topics.cmd("volume")
    async with (
        running(link),
        link.subscribe(link.topics.cmd_filter) as narrow,
        link.subscribe(f"{link.topics.base}/cmd/#") as wide,
        link.subscribe(link.topics.cmd_filter) as twin,
    ):
        await link.publish(topic, "up", qos=1)
        for sub in (narrow, wide, twin):
            assert (await first(sub.get())).payload == b"up"
        await link.publish(topic, "down", qos=1)
        for sub in (narrow, wide, twin):
            assert (await first(sub.get())).payload == b"down"  # not a duplicate "up"


async def test_subscription_queue_is_bounded_and_drops_oldest(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)
    async with running(link), link.subscribe(link.topics.alert, maxsize=2) as alerts:
        for index in range(5):
            await link.publish(link.topics.alert, str(index), qos=1)
        await eventually(lambda: alerts.dropped == 3, what="3 dropped messages")
        kept = [await first(alerts.get()), await first(alerts.get())]
    assert [m.payload for m in kept] == [b"3", b"4"]
    assert link.stats().dropped_messages == 3


async def test_publish_while_disconnected(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)
    with pytest.raises(LinkDown, match=r"not connected"):
        await link.publish(link.topics.alert, {"x": 1}, qos=1)
    await link.publish(link.topics.health, {"x": 1})  # QoS 0: dropped, counted
    assert link.stats().dropped_publishes == 1


async def test_acl_denied_publish_raises_publish_rejected(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto, user=DEVICE_1)
    other = Topics(mosquitto.prefix, "school1", "room2")
    async with running(link):
        await link.publish(link.topics.health, {"ok": True}, qos=1)  # its own topic
        with pytest.raises(PublishRejected) as caught:
            await link.publish(other.health, {"spoof": True}, qos=1)
        assert caught.value.reason_code == 0x87
        assert "Not authorized" in str(caught.value)
        with pytest.raises(PublishRejected):  # config/desired is IT's, read-only for devices
            await link.publish(link.topics.config_desired, {"evil": 1}, qos=1)
        # signalling only as itself
        await link.publish(link.topics.rtc(DEVICE_1, DEVICE_2), {"sdp": "..."}, qos=1)
        with pytest.raises(PublishRejected):
            await link.publish(link.topics.rtc(DEVICE_2, DEVICE_1), {"sdp": "..."}, qos=1)
        assert link.is_connected  # a rejection does not cost the connection


async def test_device_receives_commands_but_not_other_rooms_traffic(
    mosquitto: BrokerUnderTest,
) -> None:
    link = make_link(mosquitto, user=DEVICE_1)
    other = Topics(mosquitto.prefix, "school1", "room2")
    async with (
        running(link),
        link.subscribe(f"{mosquitto.prefix}/#") as everything,
        observing(mosquitto, user=ADMIN) as admin,
    ):
        await admin.publish(other.cmd("reboot"), "not for you")
        await admin.publish(link.topics.cmd("reboot"), "for you")
        message = await first(everything.get())
        while message.topic.endswith("/state"):  # lesson peers read rooms' online state
            message = await first(everything.get())
    assert message.topic == link.topics.cmd("reboot")


# -- credentials ------------------------------------------------------------------------


async def test_wrong_password_raises_link_auth_error(mosquitto: BrokerUnderTest) -> None:
    config = mosquitto.broker_config(DEVICE_1)
    assert config.password_file is not None
    config.password_file.write_text("wrong\n")
    link = MqttLink(config, mosquitto.identity(), software_version="x", profile_name="y")
    with pytest.raises(LinkAuthError) as caught:
        await first(link.run())
    text = str(caught.value)
    assert f"broker {mosquitto.url} refused the credentials for user '{DEVICE_1}'" in text
    assert "broker.password_file" in text
    assert "Not authorized" in text or "Bad user name or password" in text
    assert not link.is_connected


async def test_missing_password_file_is_a_config_error(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    config = mosquitto.broker_config(DEVICE_1, password_file=tmp_path / "nope")
    link = MqttLink(config, mosquitto.identity(), software_version="x", profile_name="y")
    with pytest.raises(LinkConfigError, match=r"broker.password_file: cannot read .*nope"):
        await first(link.run())


# -- TLS --------------------------------------------------------------------------------


async def test_tls_with_client_certificate_connects(mosquitto_tls: BrokerUnderTest) -> None:
    link = make_link(mosquitto_tls, user=DEVICE_1)
    assert link.url.startswith("mqtts://")
    async with running(link), observing(mosquitto_tls, link.topics.alert) as observer:
        await link.publish(link.topics.alert, {"raised": "camera_lost"}, qos=1)
        seen = await observer.wait_for(link.topics.alert)
    assert seen.json() == {"raised": "camera_lost"}


async def test_tls_certificate_from_another_ca_is_refused(mosquitto_tls: BrokerUnderTest) -> None:
    material = mosquitto_tls.tls_material
    assert material is not None
    assert material.rogue_client is not None
    config = mosquitto_tls.broker_config(DEVICE_1)
    assert config.tls is not None
    tls = config.tls.model_copy(
        update={"cert_file": material.rogue_client.cert, "key_file": material.rogue_client.key}
    )
    link = MqttLink(
        config.model_copy(update={"tls": tls}),
        mosquitto_tls.identity(),
        software_version="x",
        profile_name="y",
    )
    with pytest.raises(LinkConfigError) as caught:
        await first(link.run())
    text = str(caught.value)
    assert "client certificate" in text
    assert "broker.tls.cert_file" in text


async def test_tls_expired_client_certificate_is_refused(mosquitto_tls: BrokerUnderTest) -> None:
    material = mosquitto_tls.tls_material
    assert material is not None
    assert material.expired_client is not None
    config = mosquitto_tls.broker_config(DEVICE_1)
    assert config.tls is not None
    tls = config.tls.model_copy(
        update={"cert_file": material.expired_client.cert, "key_file": material.expired_client.key}
    )
    link = MqttLink(
        config.model_copy(update={"tls": tls}),
        mosquitto_tls.identity(),
        software_version="x",
        profile_name="y",
    )
    with pytest.raises(LinkConfigError, match=r"broker\.tls\.cert_file"):
        await first(link.run())


async def test_tls_broker_certificate_from_unknown_ca_is_refused(
    mosquitto_tls: BrokerUnderTest,
) -> None:
    material = mosquitto_tls.tls_material
    assert material is not None
    assert material.rogue_ca_cert is not None
    config = mosquitto_tls.broker_config(DEVICE_1)
    assert config.tls is not None
    tls = config.tls.model_copy(update={"ca_file": material.rogue_ca_cert})
    link = MqttLink(
        config.model_copy(update={"tls": tls}),
        mosquitto_tls.identity(),
        software_version="x",
        profile_name="y",
    )
    with pytest.raises(LinkConfigError) as caught:
        await first(link.run())
    text = str(caught.value)
    assert "certificate verify failed" in text
    assert "broker.tls.ca_file" in text


async def test_embedded_broker_url_override(tmp_path: Path) -> None:
    async with MosquittoBroker() as broker:
        link = MqttLink(
            BrokerConfig(),  # url empty: the runtime passes the embedded broker's URL
            IdentityConfig(site="s1", room="r1"),
            software_version="x",
            profile_name="y",
            url_override=broker.url,
        )
        async with running(link):
            assert link.stats().url == broker.url


# -- promptness and recovery ------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts"])
async def test_cancel_while_connecting_is_prompt(scheme: str, tmp_path: Path) -> None:
    """A broker that accepts TCP but never answers: stuck in CONNACK wait (mqtt) or in
    the TLS handshake on the connect thread (mqtts). Cancellation must not wait."""
    from agent.config.models import TlsConfig
    from agent.testkit import make_test_pki

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accept()ed: the kernel completes the handshake anyway
        port = silent.getsockname()[1]
        tls = None
        if scheme == "mqtts":
            pki = await asyncio.to_thread(make_test_pki, tmp_path / "pki")
            tls = TlsConfig(ca_file=pki.ca_cert)
        link = MqttLink(
            BrokerConfig(url=f"{scheme}://127.0.0.1:{port}", tls=tls),
            IdentityConfig(site="school1", room="room1"),
            software_version="x",
            profile_name="y",
        )
        task = asyncio.create_task(link.run(), name="link-connecting")
        await eventually(lambda: link.stats().connect_attempts == 1, what="an attempt")
        await asyncio.sleep(0.2)  # let it get stuck
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0


async def test_shutdown_is_prompt_even_if_the_broker_hangs(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)
    task = asyncio.create_task(link.run(), name="link-under-test")
    await first(link.wait_connected())
    pid = mosquitto.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # no PUBACK will come
    try:
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_auth_failure_after_connecting_is_retried_and_rotation_recovers(
    mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    config = mosquitto.broker_config(DEVICE_1)
    assert config.password_file is not None
    link = MqttLink(config, mosquitto.identity(), software_version="x", profile_name="y")
    caplog.set_level(logging.WARNING, logger="agent.sync.link")
    async with running(link) as task:
        mosquitto.users[DEVICE_1] = "rotated-password"
        await mosquitto.restart()  # the broker comes back with a new password file
        await eventually(
            lambda: any("refused the connection" in r.getMessage() for r in caplog.records),
            what="the refusal to be logged",
        )
        assert not task.done()  # not fatal once the link has been up
        config.password_file.write_text("rotated-password\n")  # re-read before each attempt
        await first(link.wait_connected())
        assert link.stats().connects == 2


@pytest.mark.slow
async def test_frozen_broker_is_detected_by_keepalive(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto)  # keepalive 5 s: PINGREQ after 5 s idle, dead 5 s later
    async with running(link):
        await eventually(lambda: link.stats().ping_rtt_ms is not None, within=10, what="a ping")
        pid = mosquitto.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await eventually(lambda: not link.is_connected, within=20, what="keepalive timeout")
        finally:
            os.kill(pid, signal.SIGCONT)
        await first(link.wait_connected(), within=20)
        assert link.stats().connects == 2


async def test_an_observer_link_reads_the_fleet_without_joining_it(
    mosquitto: BrokerUnderTest,
) -> None:
    device = make_link(mosquitto)
    observer = MqttLink(
        mosquitto.broker_config(None),
        mosquitto.identity(DEVICE_2),
        software_version="0.0.0-test",
        profile_name="dashboard",
        announce=False,
    )
    async with observing(mosquitto, f"{mosquitto.prefix}/#") as plain:
        async with (
            running(observer),
            observer.subscribe(_state(device)) as states,
            running(device),
        ):
            birth = await first(states.get())
            assert birth.json()["device"] == DEVICE_1
        # the observer came and went without a birth, a will or a shutdown state
        await plain.wait_for(_state(device), lambda m: m.json()["status"] == "offline")
        assert plain.received(observer.topics.state) == []

"""Pushed profiles end to end: real daemons, a real Mosquitto with the fleet's ACL, the
real IT tools. The reliability matrix: every bad document refused with its reason while
the room keeps running on its previous config; breaking changes rolled back by themselves."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.sync import (
    Envelope,
    KeyPair,
    Keyring,
    ProfileBook,
    Scope,
    generate_key,
    public_key_text,
    sign,
    wave_bucket,
)
from tests.brokers import ADMIN, DEVICE_1, DEVICE_2, BrokerUnderTest, MqttObserver, observing
from tests.test_daemon import Daemon, daemon_factory, site_config
from tests.test_stream_rejoin import GROUP, go_live, new_daemon, room_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
__all__ = ["daemon_factory"]  # a fixture, used by the tests below


class It:
    """IT's side: three keys (two pinned), signing, publishing as the admin user."""

    def __init__(self, tmp_path: Path, broker: BrokerUnderTest) -> None:
        self.dir = tmp_path / "it-keys"
        self.keys: list[KeyPair] = [generate_key(self.dir) for _ in range(3)]
        self.broker = broker
        self.prefix = broker.prefix

    @property
    def pinned(self) -> list[str]:
        return [public_key_text(k.public) for k in self.keys[:2]]

    def sign(
        self, payload: str | bytes, scope: str, version: int, key: int = 0, **kw: Any
    ) -> Envelope:
        data = payload.encode() if isinstance(payload, str) else payload
        return sign(
            data,
            payload_type="config",
            scope=Scope.parse(scope),
            version=version,
            keys=[self.keys[key]],
            **kw,
        )

    def topic(self, layer: str) -> str:
        kind, _, name = layer.partition(":")
        if kind == "fleet":
            return f"{self.prefix}/fleet/config/desired"
        if kind in ("school", "group"):
            return f"{self.prefix}/fleet/{kind}/{name}/config/desired"
        site, room = name.split(".")
        return f"{self.prefix}/{site}/{room}/config/desired"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        broker_args = [
            "--broker",
            self.broker.url,
            "--prefix",
            self.prefix,
            "--username",
            ADMIN,
            "--password-file",
            str(self.broker.password_file(ADMIN)),
        ]
        full = [sys.executable, "-m", "agent.cli", "profile", *args]
        if args[0] in ("push", "clear", "status"):
            full += broker_args
        done = subprocess.run(
            full, capture_output=True, text=True, timeout=60, cwd=REPO, check=False
        )
        if check:
            assert done.returncode == 0, done.stderr + done.stdout
        return done


def config_show(site_file: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "show", "-c", str(site_file)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    return done.stdout


def trusting(config: dict[str, Any], it: It) -> dict[str, Any]:
    return {**config, "profiles": {"trusted_keys": it.pinned}}


def trusting_rooms(broker: BrokerUnderTest, tmp_path: Path, it: It) -> list[Daemon]:
    """The two rooms' daemons (not started), each pinning IT's keys."""
    return [
        new_daemon(
            tmp_path,
            device,
            trusting(room_config(broker.url, broker.prefix, device, tmp_path / f"s-{device}"), it),
        )
        for device in (DEVICE_1, DEVICE_2)
    ]


def layer_of(message: Any, layer: str) -> dict[str, Any]:
    return dict(message.json().get("layers", {}).get(layer) or {})


async def answered(
    observer: MqttObserver,
    device: str,
    layer: str,
    state: str,
    *,
    version: int | None = None,
    code: str | None = None,
    within: float = 30,
) -> dict[str, Any]:
    """The device's retained answer for ``layer`` once it says ``state``."""
    site, room = device.split(".")
    topic = f"{PREFIXES[id(observer)]}/{site}/{room}/config/reported"

    def matches(message: Any) -> bool:
        entry = layer_of(message, layer)
        return (
            entry.get("state") == state
            and (version is None or entry.get("version") == version)
            and (code is None or entry.get("code") == code)
        )

    return layer_of(await observer.wait_for(topic, matches, within=within), layer)


async def in_effect(observer: MqttObserver, device: str, effective: dict[str, int]) -> None:
    """Until the device says these layer versions are what it runs on."""
    site, room = device.split(".")
    topic = f"{PREFIXES[id(observer)]}/{site}/{room}/config/reported"
    await observer.wait_for(topic, lambda m: m.json()["effective"] == effective, within=30)


PREFIXES: dict[int, str] = {}


@contextlib.asynccontextmanager
async def admin_watching(broker: BrokerUnderTest) -> AsyncIterator[MqttObserver]:
    """Everything under the test's prefix, read (and published) as IT's admin user."""
    async with observing(broker, f"{broker.prefix}/#", user=ADMIN) as observer:
        PREFIXES[id(observer)] = broker.prefix
        try:
            yield observer
        finally:
            del PREFIXES[id(observer)]


@pytest.fixture
def it(tmp_path: Path, mosquitto: BrokerUnderTest) -> It:
    return It(tmp_path, mosquitto)


# -- the matrix --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_the_reliability_matrix_every_bad_document_is_refused_and_the_room_runs_on(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any, it: It
) -> None:
    groups = [{"group": "music", "role": "main", "receivers": [DEVICE_2]}]
    config = trusting(site_config(mosquitto, tmp_path), it)
    config["identity"] = {**config["identity"], "groups": groups}
    daemon: Daemon = daemon_factory(config)
    base = f"{mosquitto.prefix}/school1/room1"
    room = f"room:{DEVICE_1}"
    async with admin_watching(mosquitto) as observer:
        await daemon.start()
        await daemon.wait_notified("READY=1")

        async def push(layer: str, raw: bytes) -> None:
            await observer.publish(it.topic(layer), raw, retain=True)

        # Two good ones first: v1, then v2 (so that both an older and an equal one exist).
        await push(room, it.sign("health:\n  interval_s: 2\n", room, 1).raw)
        await answered(observer, DEVICE_1, room, "applied", version=1)
        await push(room, it.sign("health:\n  interval_s: 1.5\n", room, 2).raw)
        applied = await answered(observer, DEVICE_1, room, "applied", version=2)
        assert applied["applied_version"] == 2

        good = it.sign("health:\n  interval_s: 4\n", room, 3)
        document = json.loads(good.raw)

        def edited(**fields: Any) -> bytes:
            return json.dumps({**document, **fields}).encode()

        payload = bytearray(good.payload)
        payload[0] ^= 0x20
        stranger = generate_key(tmp_path / "stranger")
        forged_sig = json.loads(
            sign(
                good.payload,
                payload_type="config",
                scope=Scope.parse(room),
                version=3,
                keys=[stranger],
            ).raw
        )["signatures"][0]["sig"]
        big = b"logging:\n  level: info\n#" + b"x" * (170 * 1024) + b"\n"
        cases: list[tuple[str, str, bytes, str]] = [
            (
                "forged signature",
                room,
                edited(signatures=[{"keyid": it.keys[0].key_id, "sig": forged_sig}]),
                "bad-signature",
            ),
            (
                "unknown key",
                room,
                it.sign("health:\n  interval_s: 4\n", room, 3, key=2).raw,
                "unknown-key",
            ),
            (
                "flipped payload byte",
                room,
                edited(payload=base64.b64encode(bytes(payload)).decode()),
                "bad-signature",
            ),
            ("flipped scope", room, edited(scope=f"room:{DEVICE_1},{DEVICE_2}"), "bad-signature"),
            ("flipped version", room, edited(version=4), "bad-signature"),
            (
                "expired",
                room,
                it.sign(
                    "health:\n  interval_s: 4\n",
                    room,
                    3,
                    expires_in=dt.timedelta(seconds=5),
                    now=time.time() - 60,
                ).raw,
                "expired",
            ),
            (
                "issued in the future",
                room,
                it.sign("health:\n  interval_s: 4\n", room, 3, now=time.time() + 7200).raw,
                "issued-in-future",
            ),
            (
                "replayed older version",
                room,
                it.sign("health:\n  interval_s: 4\n", room, 1).raw,
                "replayed",
            ),
            ("equal version", room, it.sign("health:\n  interval_s: 4\n", room, 2).raw, "replayed"),
            (
                "another room",
                room,
                it.sign("health:\n  interval_s: 4\n", f"room:{DEVICE_2}", 3).raw,
                "wrong-scope",
            ),
            (
                "another school",
                "school:school1",
                it.sign("health:\n  interval_s: 4\n", "school:school2", 3).raw,
                "wrong-scope",
            ),
            (
                "room profile on the school topic",
                "school:school1",
                it.sign("health:\n  interval_s: 4\n", room, 3).raw,
                "wrong-topic",
            ),
            (
                "schema-invalid",
                room,
                it.sign("health:\n  interval_s: 0\n", room, 3).raw,
                "schema-invalid",
            ),
            (
                "unknown section",
                room,
                it.sign("helth:\n  interval_s: 2\n", room, 4).raw,
                "schema-invalid",
            ),
            (
                "forbidden key",
                room,
                it.sign("identity:\n  room: room9\n", room, 5).raw,
                "forbidden-key",
            ),
            (
                "forbidden state dir",
                room,
                it.sign("supervisor:\n  state_dir: /tmp/elsewhere\n", room, 6).raw,
                "forbidden-key",
            ),
            (
                "oversized",
                room,
                json.dumps(
                    {**document, "version": 7, "payload": base64.b64encode(big).decode()}
                ).encode(),
                "oversized",
            ),
        ]
        for layer in ("room:" + DEVICE_1, "school:school1", "group:music", "fleet"):
            cases.append((f"non-UTF-8 junk on {layer}", layer, b"\xff\xfe\x00junk", "malformed"))
            cases.append((f"truncated JSON on {layer}", layer, good.raw[:40], "malformed"))
        outcomes = []
        for name, layer, raw, code in cases:
            await push(layer, raw)
            entry = await answered(observer, DEVICE_1, layer, "rejected", code=code)
            assert entry["reason"], name
            outcomes.append((name, entry["code"]))
            assert daemon.process is not None
            assert daemon.process.returncode is None, name
        print(f"\nmatrix: {len(outcomes)} cases refused: {outcomes}")
        # A keys document signed by one key only.
        new_set = json.dumps(
            {"keys": [public_key_text(k.public) for k in it.keys[1:]], "threshold": 2}
        ).encode()
        one = sign(new_set, payload_type="keys", scope=Scope("fleet"), version=1, keys=[it.keys[0]])
        await observer.publish(f"{mosquitto.prefix}/fleet/config/keys", one.raw, retain=True)
        topic = f"{base}/config/reported"
        reported = await observer.wait_for(
            topic, lambda m: (m.json()["keys"]["last"] or {}).get("code") == "threshold"
        )
        assert reported.json()["keys"]["version"] == 0

        # Still on v2: the room layer and the effective config are unchanged.
        final = (await observer.wait_for(topic, lambda m: True)).json()
        assert observer.received(topic)[-1].json()["effective"] == {room: 2}
        assert final["device"] == DEVICE_1
        schema = json.loads((REPO / "schemas" / "config-reported.v1.json").read_text())
        for message in observer.received(topic):
            jsonschema.validate(message.json(), schema)
        health = json.loads((REPO / "schemas" / "health.v1.json").read_text())
        last = await observer.wait_for(
            f"{base}/health", lambda m: m.json().get("profiles", {}).get("effective") == {room: 2}
        )
        jsonschema.validate(last.json(), health)
        # The same answer on request, for a technician's command.
        request = {"id": "why", "args": {}}
        await observer.publish(f"{base}/cmd/config-report", json.dumps(request))
        result = (await observer.wait_for(f"{base}/cmd/config-report/result")).json()
        assert result["ok"], result
        assert result["result"]["layers"][room]["code"] == "malformed"
        status = json.loads(it.cli("status", "--scope", room, "--json").stdout)
        assert [(r["device"], r["state"]) for r in status] == [(DEVICE_1, "rejected")]
        history = it.cli("history", "-c", str(daemon.site_file)).stdout
        assert history.count("rejected") >= len(cases) - 4


# -- rollback --------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_a_profile_that_breaks_the_camera_or_the_broker_is_rolled_back(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any, it: It
) -> None:
    config = trusting(site_config(mosquitto, tmp_path), it)
    daemon: Daemon = daemon_factory(config)
    room = f"room:{DEVICE_1}"
    base = f"{mosquitto.prefix}/school1/room1"
    async with admin_watching(mosquitto) as observer:
        await daemon.start()
        await daemon.wait_notified("READY=1")
        camera = "capture:\n  video:\n    source: camera\n    device: /dev/video-none-99\n"
        await observer.publish(it.topic(room), it.sign(camera, room, 1, check_s=3).raw, retain=True)
        entry = await answered(observer, DEVICE_1, room, "rolled-back", version=1, within=40)
        assert "capture.video" in entry["reason"], entry
        assert entry["applied_version"] is None
        await observer.wait_for(
            f"{base}/health", lambda m: m.json()["capture"]["video"]["state"] == "ok", within=20
        )

        # The broker settings: a port nobody listens on. The device loses the broker,
        # comes back on its old settings by itself, and says so.
        dead = "broker:\n  url: mqtt://127.0.0.1:9\n"
        started = time.monotonic()
        await observer.publish(it.topic(room), it.sign(dead, room, 2, check_s=4).raw, retain=True)
        entry = await answered(observer, DEVICE_1, room, "rolled-back", version=2, within=60)
        print(f"\nbroker rollback reported after {time.monotonic() - started:.1f} s: {entry}")
        assert "not connected" in entry["reason"], entry
        await observer.wait_for(f"{base}/state", lambda m: m.json()["status"] == "online")
        history = it.cli("history", "-c", str(daemon.site_file), "--json").stdout
        assert [e["state"] for e in json.loads(history)][-2:] == ["rolled-back", "rolled-back"]


# -- offline, boot, rotation, races ----------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_a_device_offline_during_the_push_applies_it_and_boots_on_it_without_a_broker(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any, it: It
) -> None:
    config = trusting(site_config(mosquitto, tmp_path), it)
    room = f"room:{DEVICE_1}"
    signed_file = tmp_path / "school.json"
    profile = tmp_path / "school.yaml"
    profile.write_text("health:\n  interval_s: 2\nlogging:\n  level: debug\n")
    it.cli(
        "sign",
        str(profile),
        "--key",
        str(it.dir / f"{it.keys[1].key_id}.key"),
        "--scope",
        "school:school1",
        "--version",
        "3",
        "--out",
        str(signed_file),
    )
    it.cli("push", str(signed_file))  # the device is not running yet
    it.cli("push", str(signed_file.with_name("room.json")), check=False)  # a missing file
    room_doc = it.sign("health:\n  interval_s: 1.5\n", room, 1)
    async with admin_watching(mosquitto) as observer:
        await observer.publish(it.topic(room), room_doc.raw, retain=True)
        daemon: Daemon = daemon_factory(config)
        await daemon.start()
        await answered(observer, DEVICE_1, "school:school1", "applied", version=3)
        reported = await answered(observer, DEVICE_1, room, "applied", version=1)
        assert reported["applied_version"] == 1
        status = json.loads(it.cli("status", "--json").stdout)
        assert {(r["layer"], r["state"]) for r in status if r["device"] == DEVICE_1} == {
            ("school:school1", "applied"),
            (room, "applied"),
        }
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0

    # No broker at boot: the persisted layers, verified again, are what it runs on.
    offline = {**config, "broker": {**config["broker"], "url": "mqtt://127.0.0.1:9"}}
    (tmp_path / "offline.yaml").write_text(json.dumps(offline))
    shown = config_show(tmp_path / "offline.yaml")
    assert "[profile room:school1.room1 v1]" in shown
    assert "[profile school:school1 v3]" in shown
    line = next(x for x in shown.splitlines() if x.startswith("health.interval_s"))
    assert "1.5" in line
    # IT clears the room layer: the device falls back to the school's.
    async with admin_watching(mosquitto) as observer:
        await daemon.start()  # the same room again, with its broker
        await answered(observer, DEVICE_1, room, "applied", version=1)
        it.cli("clear", room, "--key", str(it.dir / f"{it.keys[0].key_id}.key"), "--version", "2")
        await answered(observer, DEVICE_1, room, "cleared", version=2)
        topic = f"{mosquitto.prefix}/school1/room1/config/reported"
        last = await observer.wait_for(
            topic, lambda m: m.json()["effective"] == {"school:school1": 3, room: 2}
        )
        # An unsigned empty message (anyone who can publish) clears nothing.
        await observer.publish(it.topic("school:school1"), b"", retain=True)
        await daemon.wait_log("ignored an unsigned empty message")
        assert last is not None


@pytest.mark.timeout(180)
async def test_keys_rotated_by_threshold_then_new_key_accepted_and_retired_key_refused(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any, it: It
) -> None:
    config = trusting(site_config(mosquitto, tmp_path), it)
    daemon: Daemon = daemon_factory(config)
    room = f"room:{DEVICE_1}"
    async with admin_watching(mosquitto) as observer:
        await daemon.start()
        await observer.publish(
            it.topic(room), it.sign("health:\n  interval_s: 2\n", room, 1).raw, retain=True
        )
        await answered(observer, DEVICE_1, room, "applied", version=1)
        keys_yaml = tmp_path / "keys.json"
        keys_yaml.write_text(
            json.dumps({"keys": [public_key_text(k.public) for k in it.keys[1:]], "threshold": 2})
        )
        signed_keys = tmp_path / "keys.signed.json"
        it.cli(
            "sign",
            str(keys_yaml),
            "--type",
            "keys",
            "--scope",
            "fleet",
            "--version",
            "1",
            "--key",
            str(it.dir / f"{it.keys[0].key_id}.key"),
            "--key",
            str(it.dir / f"{it.keys[1].key_id}.key"),
            "--out",
            str(signed_keys),
        )
        verified = it.cli("verify", str(signed_keys), "--trust", str(it.dir)).stdout
        assert "keys document" in verified
        it.cli("push", str(signed_keys))
        topic = f"{mosquitto.prefix}/school1/room1/config/reported"
        rotated = await observer.wait_for(topic, lambda m: m.json()["keys"]["version"] == 1)
        assert rotated.json()["keys"]["pinned"] == sorted(k.key_id for k in it.keys[1:])
        # v1 was signed by the retired key: dropped, the device runs on its other layers.
        await answered(observer, DEVICE_1, room, "dropped")
        await observer.publish(
            it.topic(room), it.sign("health:\n  interval_s: 3\n", room, 2, key=2).raw, retain=True
        )
        await answered(observer, DEVICE_1, room, "applied", version=2)
        await observer.publish(
            it.topic(room), it.sign("health:\n  interval_s: 4\n", room, 3, key=0).raw, retain=True
        )
        refused = await answered(observer, DEVICE_1, room, "rejected", code="retired-key")
        assert "retired" in refused["reason"]


@pytest.mark.timeout(180)
async def test_racing_pushes_the_higher_version_wins_on_every_device_and_waves_hold_devices(
    mosquitto: BrokerUnderTest, tmp_path: Path, it: It
) -> None:
    prefix = mosquitto.prefix
    daemons = trusting_rooms(mosquitto, tmp_path, it)
    school = "school:school1"
    try:
        async with admin_watching(mosquitto) as observer:
            for daemon in daemons:
                await daemon.start()
            for device in (DEVICE_1, DEVICE_2):
                await observer.wait_for(
                    f"{prefix}/{device.replace('.', '/')}/state",
                    lambda m: m.json()["status"] == "online",
                    within=30,
                )
            # Two IT consoles push at once; the broker keeps the last, devices the highest.
            v2 = it.sign("health:\n  interval_s: 2\n", school, 2)
            v3 = it.sign("health:\n  interval_s: 3\n", school, 3)
            await asyncio.gather(
                observer.publish(it.topic(school), v3.raw),
                observer.publish(it.topic(school), v2.raw),
            )
            for device in (DEVICE_1, DEVICE_2):
                await in_effect(observer, device, {school: 3})
            # A wave that holds exactly one of the two rooms back.
            buckets = {d: wave_bucket(d, Scope.parse(school)) for d in (DEVICE_1, DEVICE_2)}
            low, high = sorted(buckets, key=buckets.__getitem__)
            wave = int(buckets[low]) + 1
            assert wave <= buckets[high], buckets
            profile = tmp_path / "wave.yaml"
            profile.write_text("health:\n  interval_s: 4\n")
            out = tmp_path / "wave.json"
            key = str(it.dir / f"{it.keys[0].key_id}.key")
            it.cli(
                "sign",
                str(profile),
                "--key",
                key,
                "--scope",
                school,
                "--version",
                "4",
                "--wave",
                str(wave),
                "--out",
                str(out),
            )
            it.cli("push", str(out))
            await answered(observer, low, school, "applied", version=4)
            await answered(observer, high, school, "waiting", version=4)
            rows = json.loads(it.cli("status", "--scope", school, "--json").stdout)
            assert {r["device"]: r["state"] for r in rows} == {low: "applied", high: "waiting"}
            # A broken wave cannot be widened without --force.
            profile.write_text("health:\n  interval_s: 0.001\n")
            it.cli(
                "sign",
                str(profile),
                "--key",
                key,
                "--scope",
                school,
                "--version",
                "5",
                "--wave",
                str(wave),
                "--no-check",
                "--out",
                str(out),
            )
            it.cli("push", str(out))
            await answered(observer, low, school, "rejected", version=5, code="schema-invalid")
            profile.write_text("health:\n  interval_s: 5\n")
            it.cli(
                "sign",
                str(profile),
                "--key",
                key,
                "--scope",
                school,
                "--version",
                "6",
                "--out",
                str(out),
            )
            refused = it.cli("push", str(out), check=False)
            assert refused.returncode == 2
            assert "has failures" in refused.stderr
            it.cli("push", str(out), "--force")
            for device in (DEVICE_1, DEVICE_2):
                await answered(observer, device, school, "applied", version=6)
    finally:
        for daemon in daemons:
            await daemon.close()


@pytest.mark.timeout(200)
async def test_a_health_profile_during_a_live_lesson_applies_and_nobody_leaves(
    mosquitto: BrokerUnderTest, tmp_path: Path, it: It
) -> None:
    prefix = mosquitto.prefix
    daemons = trusting_rooms(mosquitto, tmp_path, it)
    group = f"group:{GROUP}"
    try:
        async with admin_watching(mosquitto) as observer:
            for daemon in daemons:
                await daemon.start()
            await go_live(observer, prefix)
            offers = f"{prefix}/rtc/{DEVICE_2}/{DEVICE_1}"
            offers_before = len(observer.received(offers))
            await observer.publish(
                it.topic(group), it.sign("health:\n  interval_s: 3\n", group, 1).raw, retain=True
            )
            for device in (DEVICE_1, DEVICE_2):
                await answered(observer, device, group, "applied", version=1)
            # A camera change for the group waits for the lesson's end.
            camera = "capture:\n  video:\n    fps: 10\n"
            await observer.publish(it.topic(group), it.sign(camera, group, 2).raw, retain=True)
            waiting = await answered(observer, DEVICE_1, group, "waiting", version=2)
            assert "live lesson" in waiting["reason"]
            lesson = observer.received(f"{prefix}/lesson/{GROUP}")[-1].json()
            assert DEVICE_2 in lesson.get("joined", lesson.get("rooms", [DEVICE_2]))
            assert len(observer.received(offers)) == offers_before  # nobody rejoined
    finally:
        for daemon in daemons:
            await daemon.close()


@pytest.mark.timeout(200)
async def test_two_layers_waiting_for_the_same_lesson_both_apply_when_it_ends(
    mosquitto: BrokerUnderTest, tmp_path: Path, it: It
) -> None:
    prefix = mosquitto.prefix
    daemons = trusting_rooms(mosquitto, tmp_path, it)
    school, room = "school:school1", f"room:{DEVICE_1}"
    try:
        async with admin_watching(mosquitto) as observer:
            for daemon in daemons:
                await daemon.start()
            await go_live(observer, prefix)
            # Two layers, each restarting what the lesson runs on: both wait.
            school_doc = it.sign("capture:\n  video:\n    fps: 10\n", school, 4)
            await observer.publish(it.topic(school), school_doc.raw, retain=True)
            await answered(observer, DEVICE_1, school, "waiting", version=4, code="lesson")
            room_doc = it.sign("stream:\n  video_bitrate_kbps: 400\n", room, 7)
            await observer.publish(it.topic(room), room_doc.raw, retain=True)
            await answered(observer, DEVICE_1, room, "waiting", version=7, code="lesson")

            end = f"{prefix}/school1/room1/cmd/lesson-end"
            await observer.publish(end, json.dumps({"id": "end-1", "args": {}}))
            assert (await observer.wait_for(f"{end}/result", within=20)).json()["ok"]
            # Each layer is applied, and answered with its own version.
            for layer, version in ((school, 4), (room, 7)):
                reported = await answered(observer, DEVICE_1, layer, "applied", version=version)
                assert reported["applied_version"] == version
            await in_effect(observer, DEVICE_1, {school: 4, room: 7})
            await answered(observer, DEVICE_2, school, "applied", version=4)
            shown = config_show(daemons[0].site_file)
            fps = next(x for x in shown.splitlines() if x.startswith("capture.video.fps"))
            assert "10" in fps, fps
            assert f"[profile {school} v4]" in fps, fps
            rate = next(x for x in shown.splitlines() if x.startswith("stream.video_bitrate"))
            assert "400" in rate, rate
            assert f"[profile {room} v7]" in rate, rate
    finally:
        for daemon in daemons:
            await daemon.close()


# -- kill -9 while applying ----------------------------------------------------------------

_WRITER = """
import sys, json
from pathlib import Path
from agent.sync import Keyring, ProfileBook, parse_envelope
old, new, directory = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes(), sys.argv[3]
ring = Keyring.from_texts(json.loads(sys.argv[4]), 2)
book = ProfileBook(Path(directory), device_id="school1.room1", groups=(), site_keys=ring)
book.load_applied()
envs = [parse_envelope(old), parse_envelope(new)]
print("ready", flush=True)
for i in range(100000):
    env = envs[i % 2]
    book.begin_trial("room:school1.room1", env)
    book.commit("room:school1.room1", env)
    book.high_water.clear()
"""


def kill_while_applying(tmp_path: Path, it: It, old: Envelope, new: Envelope) -> dict[str, int]:
    """100 writers killed with SIGKILL at random moments of begin_trial/commit."""
    room = f"room:{DEVICE_1}"
    (tmp_path / "old.json").write_bytes(old.raw)
    (tmp_path / "new.json").write_bytes(new.raw)
    directory = tmp_path / "state" / "profiles"
    directory.mkdir(parents=True)
    rng = random.Random(9)
    seen = {"old": 0, "new": 0}
    for _ in range(100):  # bounded: 100 kills
        with subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(tmp_path / "old.json"),
                str(tmp_path / "new.json"),
                str(directory),
                json.dumps(it.pinned),
            ],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        ) as writer:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 0.05))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        for stray in (directory / "applied").glob(".*.tmp"):  # may be left; never read
            stray.unlink()
        current = (directory / "applied" / "room_school1.room1.json").read_bytes()
        assert current in (old.raw, new.raw)
        seen["old" if current == old.raw else "new"] += 1
        book = ProfileBook(
            directory, device_id=DEVICE_1, groups=(), site_keys=Keyring.from_texts(it.pinned, 2)
        )
        book.load_applied()  # an interrupted trial is finished here
        assert book.applied[room].raw in (old.raw, new.raw)
    return seen


@pytest.mark.timeout(300)
async def test_kill_9_while_applying_leaves_the_old_or_the_new_file_and_the_agent_starts(
    mosquitto: BrokerUnderTest, tmp_path: Path, daemon_factory: Any, it: It
) -> None:
    room = f"room:{DEVICE_1}"
    old = it.sign("health:\n  interval_s: 2\n", room, 1)
    new = it.sign("health:\n  interval_s: 3\n", room, 2)
    seen = await asyncio.to_thread(kill_while_applying, tmp_path, it, old, new)
    print(f"\n100 kills: the file was whole every time (old {seen['old']}, new {seen['new']})")
    config = trusting(site_config(mosquitto, tmp_path), it)
    daemon: Daemon = daemon_factory(config)
    await daemon.start()
    await daemon.wait_notified("READY=1")

"""Home Assistant MQTT discovery: well-formed configs that read real contract fields,
retained on a real Mosquitto held to the fleet ACL."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.broker import render_acl
from agent.capture import AudioHub, FrameHub
from agent.capture.audio import SyntheticAudioSource
from agent.capture.video import SyntheticVideoSource
from agent.config.models import CaptureConfig, IdentityConfig
from agent.health.discovery import (
    HA_COMPONENTS,
    HomeAssistantDiscovery,
    discovery_configs,
    ha_node_id,
    template_paths,
)
from agent.sync import PublishRejected, Topics
from tests.brokers import (
    ADMIN,
    DASHBOARD,
    DEVICE_1,
    BrokerUnderTest,
    eventually,
    make_link,
    observing,
    running,
    serving,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
NODE = ha_node_id(DEVICE_1)
IDENTITY = IdentityConfig(site="school1", room="room1", display_name="Room 1 (Grade 5)")
TOPICS = Topics("edu", "school1", "room1")


def sample_health(**overrides: Any) -> dict[str, Any]:
    """A health message per docs/contracts.md, with capture sections from real hubs."""
    capture = CaptureConfig()
    video = FrameHub(SyntheticVideoSource(160, 120, 5), capture).stats().to_dict()
    audio = AudioHub(SyntheticAudioSource(48000, 1, 20), capture).stats().to_dict()
    video.update(state="ok", fps=29.9, mean_luma=118.2)
    audio.update(state="ok", level_dbfs=-23.5, peak_dbfs=-6.0)
    message: dict[str, Any] = {
        "v": 1,
        "ts": time.time(),
        "n": 42,
        "device": DEVICE_1,
        "system": {
            "cpu_percent": 23.5,
            "load1": 0.7,
            "memory_percent": 41.0,
            "disk_percent": 37.2,
            "disk_free_mb": 80123.0,
            "temperature_c": 51.0,
            "uptime_s": 3600.0,
            "clock_synced": True,
        },
        "mqtt": {
            "connected": True,
            "seq": 3,
            "connects": 3,
            "disconnects": 2,
            "publish_rtt_ms": 4.2,
            "ping_rtt_ms": 3.1,
            "queued": 0,
        },
        "capture": {"video": video, "audio": audio},
        "agent": {
            "version": "0.1.0",
            "profile": "virtual",
            "cpu_percent": 5.0,
            "rss_mb": 120.0,
            "uptime_s": 3500.0,
            "services": {"mqtt": "running", "capture.video": "running"},
        },
        "alerts": {
            "active": [
                {
                    "id": "6f1c",
                    "rule": "disk_full",
                    "severity": "warning",
                    "since": time.time() - 60,
                    "message": "disk 91% full",
                }
            ]
        },
        "stream": None,
        "sensing": None,
    }
    message.update(overrides)
    return message


def sample_state() -> dict[str, Any]:
    return {
        "status": "online",
        "device": DEVICE_1,
        "site": "school1",
        "room": "room1",
        "version": "0.1.0",
        "profile": "virtual",
        "boot_time": "2026-11-02T07:00:00Z",
        "connected_at": "2026-11-02T07:00:01.000Z",
        "seq": 3,
    }


def resolve(document: Any, path: tuple[str, ...]) -> Any:
    node = document
    for part in path:
        assert isinstance(node, dict), f"{'.'.join(path)}: {part!r} is inside a non-object"
        assert part in node, f"{'.'.join(path)} is not in the message"
        node = node[part]
    return node


def configs() -> dict[str, dict[str, Any]]:
    return discovery_configs(
        IDENTITY, TOPICS, software_version="1.2.3", model="virtual", health_interval_s=10
    )


# -- the configs ---------------------------------------------------------------------------


def test_configs_are_well_formed_and_unique() -> None:
    published = configs()
    topic_re = re.compile(
        rf"^homeassistant/({'|'.join(HA_COMPONENTS)})/{NODE}/[a-zA-Z0-9_-]+/config$"
    )
    unique_ids = set()
    entity_ids = set()
    for topic, config in published.items():
        component = topic_re.match(topic)
        assert component, topic
        json.loads(json.dumps(config, allow_nan=False))
        for key in ("name", "unique_id", "state_topic", "value_template", "device", "origin"):
            assert config.get(key), f"{topic}: no {key}"
        assert config["device"] == {
            "identifiers": [DEVICE_1],
            "name": "Room 1 (Grade 5)",
            "manufacturer": "Classroom Edge Agent",
            "model": "virtual",
            "sw_version": "1.2.3",
        }
        assert config["default_entity_id"].startswith(f"{component.group(1)}.{NODE}_")
        assert not config["name"].startswith("Room 1")  # HA strips a device-name prefix
        unique_ids.add(config["unique_id"])
        entity_ids.add(config["default_entity_id"])
        if config["state_topic"] == TOPICS.health:
            assert config["availability"] == [
                {
                    "topic": TOPICS.state,
                    "value_template": "{{ value_json.status }}",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            ]
            assert config["expire_after"] == 30
        else:
            assert config["state_topic"] == TOPICS.state
            assert "availability" not in config  # "online" must show offline, not unavailable
    assert len(unique_ids) == len(entity_ids) == len(published)

    online = published[f"homeassistant/binary_sensor/{NODE}/online/config"]
    assert online["device_class"] == "connectivity"
    assert (online["payload_on"], online["payload_off"]) == ("online", "offline")
    names = {config["name"] for config in published.values()}
    assert {"Camera", "Video frame rate", "Microphone level", "CPU", "Temperature"} <= names
    assert {"Disk used", "Broker round trip", "Alert"} <= names
    # Without a display name, the device is called by its id.
    bare = discovery_configs(
        IdentityConfig(site="school1", room="room1"),
        TOPICS,
        software_version="1",
        model="m",
        health_interval_s=60,
    )
    first = next(iter(bare.values()))
    assert first["device"]["name"] == DEVICE_1
    assert next(c for c in bare.values() if "expire_after" in c)["expire_after"] == 180


def test_templates_read_fields_of_the_contract() -> None:
    health = sample_health()
    state = sample_state()
    with (SCHEMAS / "health.v1.json").open() as handle:
        jsonschema.validate(health, json.load(handle))
    with (SCHEMAS / "state.v1.json").open() as handle:
        jsonschema.validate(state, json.load(handle))
    checked = 0
    for config in configs().values():
        document = health if config["state_topic"] == TOPICS.health else state
        templates = [config["value_template"]]
        if "json_attributes_template" in config:
            assert config["json_attributes_topic"] == config["state_topic"]
            templates.append(config["json_attributes_template"])
        for template in templates:
            for path in template_paths(template):
                if path == ("reason",) and document is state:
                    continue  # only in the will / shutdown message; the template defaults it
                resolve(document, path)
                checked += 1
        for entry in config.get("availability", []):
            for path in template_paths(entry["value_template"]):
                resolve(state, path)
    assert checked >= len(configs())
    assert resolve(health, ("capture", "audio", "level_dbfs")) == -23.5


def test_node_id_and_acl_collisions() -> None:
    assert ha_node_id("school-1.room_2") == "school-1_room_2"
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", ha_node_id(DEVICE_1))
    acl = render_acl([IDENTITY], prefix="edu", admins=["it"], readers=["ha"])
    lines = acl.splitlines()
    assert f"topic write homeassistant/sensor/{NODE}/+/config" in lines
    assert f"topic write homeassistant/binary_sensor/{NODE}/+/config" in lines
    assert "topic readwrite homeassistant/#" in lines[lines.index("user it") :]
    assert "topic read homeassistant/#" in lines[lines.index("user ha") :]
    assert "homeassistant" not in render_acl([IDENTITY], discovery_prefix=None)
    with pytest.raises(ValueError, match=r"would share the Home Assistant node id 'a_b_c'"):
        render_acl([IdentityConfig(site="a_b", room="c"), IdentityConfig(site="a", room="b_c")])


# -- on a real broker -----------------------------------------------------------------------


async def test_configs_are_retained_and_republished_after_a_broker_restart(
    mosquitto: BrokerUnderTest,
) -> None:
    link = make_link(mosquitto, user=DEVICE_1)  # the ACL applies to the device
    service = HomeAssistantDiscovery(
        link, software_version="1.2.3", model="virtual", health_interval_s=10
    )
    expected = set(service.configs)
    async with running(link), serving(service):
        await eventually(lambda: service.published >= 1, what="discovery published")
        # Home Assistant (the read-only dashboard user) connects later: retained copies.
        async with observing(mosquitto, "homeassistant/#", user=DASHBOARD) as ha:
            await eventually(lambda: {m.topic for m in ha.messages} >= expected, what="configs")
            assert all(m.retain for m in ha.messages)
            for message in ha.messages:
                assert message.json() == service.configs[message.topic]
        # The test broker keeps nothing across a restart: the device must send them again.
        await mosquitto.restart()
        await eventually(lambda: service.published >= 2, within=20, what="republished")
        async with observing(mosquitto, "homeassistant/#", user=DASHBOARD) as ha:
            await eventually(lambda: {m.topic for m in ha.messages} >= expected, what="again")

        # remove(): empty retained payloads make Home Assistant delete the entities.
        await service.remove()
        async with observing(mosquitto, "homeassistant/#", user=DASHBOARD) as ha:
            await asyncio.sleep(0.3)
            assert ha.messages == []


async def test_a_device_writes_only_its_own_discovery_configs(mosquitto: BrokerUnderTest) -> None:
    link = make_link(mosquitto, user=DEVICE_1)
    other = ha_node_id("school1.room2")
    config = {"name": "Fake", "state_topic": "x", "unique_id": "fake"}
    async with running(link):
        await link.publish(f"homeassistant/sensor/{NODE}/extra/config", config, qos=1)
        with pytest.raises(PublishRejected):
            await link.publish(f"homeassistant/sensor/{other}/cpu/config", config, qos=1)
        with pytest.raises(PublishRejected):  # nothing Home Assistant would publish for
            await link.publish(f"homeassistant/switch/{NODE}/reboot/config", config, qos=1)
        with pytest.raises(PublishRejected):
            await link.publish("homeassistant/status", "online", qos=1)
    async with observing(mosquitto, user=ADMIN) as it:  # IT can clean up a retired room
        await it.publish(f"homeassistant/sensor/{other}/cpu/config", b"", retain=True)

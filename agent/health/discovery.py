"""Home Assistant MQTT discovery: a stock Home Assistant becomes a fleet dashboard.

Opt-in (``health.home_assistant_discovery``). The device publishes retained configs
under ``homeassistant/{component}/{node_id}/{object_id}/config`` describing one Home
Assistant *device* per room (identifiers = the device id) whose entities read the
topics the agent already publishes, so no extra telemetry is sent:

* sensors on the health topic, each picking one field with a ``value_template``
  (field names from docs/contracts.md): camera state, video fps, microphone level,
  CPU, temperature, disk, broker round trip, active alerts;
* binary sensors: ``online`` from the retained state topic (birth / Last Will), and
  problem sensors for the camera, the microphone and active alerts.

Every entity except ``online`` is *available* only while the state topic says
``online``, so a room that lost power shows "unavailable" rather than its last
numbers. Health sensors also expire after three telemetry periods without a message.

Topic levels: Home Assistant accepts only ``[a-zA-Z0-9_-]`` in ``node_id`` and a device
id has a dot, so the node id is the device id with ``.`` replaced by ``_``
(`ha_node_id`). The fleet ACL (`agent.broker.acl`) lets each device write only
``homeassistant/{sensor,binary_sensor}/{node_id}/+/config`` (read-only entity types:
nothing Home Assistant would publish commands for), and refuses to render a fleet
where two devices would share a node id.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

from agent.config import IdentityConfig
from agent.sync import LinkError, MqttLink, PublishRejected, Topics

log = logging.getLogger(__name__)

HA_DISCOVERY_PREFIX = "homeassistant"
# The only components a device announces (and so the only ones the ACL lets it write):
# read-only entities, none with a command_topic Home Assistant would publish to.
HA_COMPONENTS = ("sensor", "binary_sensor")
MANUFACTURER = "Classroom Edge Agent"
_POLL_S = 1.0


def ha_node_id(device_id: str) -> str:
    """The Home Assistant node id of a device (``school1.room-1`` -> ``school1_room-1``)."""
    return device_id.replace(".", "_")


@dataclass(frozen=True)
class _Entity:
    component: str  # sensor | binary_sensor
    object_id: str
    name: str
    fields: dict[str, Any]
    on_state_topic: bool = False  # reads the state topic instead of health


# One definition per entity; the templates follow docs/contracts.md field names.
_ENTITIES: tuple[_Entity, ...] = (
    _Entity(
        "binary_sensor",
        "online",
        "Online",
        {
            "device_class": "connectivity",
            "value_template": "{{ value_json.status }}",
            "payload_on": "online",
            "payload_off": "offline",
            "json_attributes_template": (
                "{{ {'seq': value_json.seq, 'version': value_json.version, "
                "'reason': value_json.reason | default(none)} | tojson }}"
            ),
        },
        on_state_topic=True,
    ),
    _Entity(
        "sensor",
        "camera_state",
        "Camera",
        {
            "icon": "mdi:cctv",
            "value_template": "{{ value_json.capture.video.state }}",
            "json_attributes_template": (
                "{{ {'reason': value_json.capture.video.reason, "
                "'mode': value_json.capture.video.mode} | tojson }}"
            ),
        },
    ),
    _Entity(
        "binary_sensor",
        "camera_problem",
        "Camera problem",
        {
            "device_class": "problem",
            "value_template": ("{{ 'OFF' if value_json.capture.video.state == 'ok' else 'ON' }}"),
        },
    ),
    _Entity(
        "sensor",
        "video_fps",
        "Video frame rate",
        {
            "unit_of_measurement": "fps",
            "state_class": "measurement",
            "icon": "mdi:filmstrip",
            "value_template": "{{ value_json.capture.video.fps }}",
        },
    ),
    _Entity(
        "sensor",
        "mic_state",
        "Microphone",
        {
            "icon": "mdi:microphone",
            "value_template": "{{ value_json.capture.audio.state }}",
        },
    ),
    _Entity(
        "binary_sensor",
        "mic_problem",
        "Microphone problem",
        {
            "device_class": "problem",
            "value_template": ("{{ 'OFF' if value_json.capture.audio.state == 'ok' else 'ON' }}"),
        },
    ),
    _Entity(
        "sensor",
        "mic_level",
        "Microphone level",
        {
            "unit_of_measurement": "dBFS",
            "state_class": "measurement",
            "icon": "mdi:microphone-outline",
            "value_template": "{{ value_json.capture.audio.level_dbfs }}",
        },
    ),
    _Entity(
        "sensor",
        "cpu",
        "CPU",
        {
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "icon": "mdi:cpu-64-bit",
            "entity_category": "diagnostic",
            "value_template": "{{ value_json.system.cpu_percent }}",
        },
    ),
    _Entity(
        "sensor",
        "temperature",
        "Temperature",
        {
            "device_class": "temperature",
            "unit_of_measurement": "°C",
            "state_class": "measurement",
            "entity_category": "diagnostic",
            "value_template": "{{ value_json.system.temperature_c }}",
        },
    ),
    _Entity(
        "sensor",
        "disk",
        "Disk used",
        {
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "icon": "mdi:harddisk",
            "entity_category": "diagnostic",
            "value_template": "{{ value_json.system.disk_percent }}",
        },
    ),
    _Entity(
        "sensor",
        "broker_rtt",
        "Broker round trip",
        {
            "device_class": "duration",
            "unit_of_measurement": "ms",
            "state_class": "measurement",
            "entity_category": "diagnostic",
            "value_template": "{{ value_json.mqtt.publish_rtt_ms }}",
        },
    ),
    _Entity(
        "sensor",
        "alerts",
        "Active alerts",
        {
            "state_class": "measurement",
            "icon": "mdi:alert",
            "value_template": "{{ value_json.alerts.active | length }}",
        },
    ),
    _Entity(
        "binary_sensor",
        "alert_problem",
        "Alert",
        {
            "device_class": "problem",
            "value_template": "{{ 'ON' if value_json.alerts.active else 'OFF' }}",
            "json_attributes_template": (
                "{{ {'alerts': value_json.alerts.active | map(attribute='message') | list} "
                "| tojson }}"
            ),
        },
    ),
)


def discovery_configs(
    identity: IdentityConfig,
    topics: Topics,
    *,
    software_version: str,
    model: str,
    health_interval_s: float,
    discovery_prefix: str = HA_DISCOVERY_PREFIX,
) -> dict[str, dict[str, Any]]:
    """``{config topic: config payload}`` for this room (see the module docstring)."""
    device_id = identity.device_id
    node = ha_node_id(device_id)
    device = {
        "identifiers": [device_id],
        "name": identity.display_name or device_id,
        "manufacturer": MANUFACTURER,
        "model": model,
        "sw_version": software_version,
    }
    availability = [
        {
            "topic": topics.state,
            "value_template": "{{ value_json.status }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    configs: dict[str, dict[str, Any]] = {}
    for entity in _ENTITIES:
        config: dict[str, Any] = {
            "name": entity.name,
            "unique_id": f"{device_id}-{entity.object_id}",
            # Home Assistant 2025.10 replaced "object_id" with this (object_id ends in 2026.4).
            "default_entity_id": f"{entity.component}.{node}_{entity.object_id}",
            "has_entity_name": True,
            "device": device,
            "origin": {"name": "classroom-agent", "sw_version": software_version},
            "qos": 1 if entity.on_state_topic else 0,
            **entity.fields,
        }
        if entity.on_state_topic:
            config["state_topic"] = topics.state
            if "json_attributes_template" in config:
                config["json_attributes_topic"] = topics.state
        else:
            config["state_topic"] = topics.health
            config["availability"] = availability
            # Telemetry that stops (agent hung, network down) turns "unavailable".
            config["expire_after"] = max(30, round(3 * health_interval_s))
            if "json_attributes_template" in config:
                config["json_attributes_topic"] = topics.health
        topic = f"{discovery_prefix}/{entity.component}/{node}/{entity.object_id}/config"
        configs[topic] = config
    return configs


_PATH = re.compile(r"value_json((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def template_paths(template: str) -> list[tuple[str, ...]]:
    """The ``value_json.a.b`` paths a template reads (to check them against the contract)."""
    return [tuple(match.split(".")[1:]) for match in _PATH.findall(template)]


class HomeAssistantDiscovery:
    """A supervisor service: publish the discovery configs after every (re)connect.

    Retained, so Home Assistant (and a restarted broker with persistence) has them
    without the device online; re-sent on each connection because a broker without
    persistence forgets them. ``remove()`` publishes empty retained payloads, which
    tells Home Assistant to delete the entities (when IT turns discovery off).
    """

    name = "ha-discovery"

    def __init__(
        self,
        link: MqttLink,
        *,
        software_version: str,
        model: str,
        health_interval_s: float,
        discovery_prefix: str = HA_DISCOVERY_PREFIX,
    ) -> None:
        self._link = link
        self.configs = discovery_configs(
            link.identity,
            link.topics,
            software_version=software_version,
            model=model,
            health_interval_s=health_interval_s,
            discovery_prefix=discovery_prefix,
        )
        self.published = 0

    async def publish_all(self) -> None:
        """Publish every config (retained, QoS 1); raises `LinkError` on failure."""
        for topic, config in self.configs.items():
            await self._link.publish(topic, config, qos=1, retain=True)
        self.published += 1
        log.info(
            "published %d Home Assistant discovery configs for %s",
            len(self.configs),
            self._link.identity.device_id,
        )

    async def remove(self) -> None:
        """Withdraw every config (empty retained payloads)."""
        for topic in self.configs:
            await self._link.publish(topic, b"", qos=1, retain=True)

    async def run(self) -> None:
        seq_done: int | None = None
        while True:
            await self._link.wait_connected()
            seq = self._link.seq
            if seq != seq_done:
                try:
                    await self.publish_all()
                    seq_done = seq
                except PublishRejected as exc:
                    # A deployment error (the ACL lacks the homeassistant lines): say so
                    # once per connection and try again later rather than spin.
                    log.error("Home Assistant discovery refused by the broker: %s", exc)
                    seq_done = seq
                except LinkError as exc:
                    log.debug("discovery not published yet: %s", exc)
            # The link has no connect event: poll for a new birth seq, cheaply.
            await asyncio.sleep(_POLL_S)

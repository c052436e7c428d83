"""The MQTT link to the fleet broker, and the embedded Mosquitto for demos and tests.

The rest of the agent uses `MqttLink` (one per agent: publish, subscribe, state,
stats), `Topics` (every topic name), the errors below, `HealthReporter` (periodic
telemetry over the link, with `SystemMetrics` and `ProcessMetrics`), `AlertEngine`
(alert rules with hysteresis) and `ReliablePublisher` over an `Outbox` (QoS 1
store-and-forward in SQLite for alerts and events). `MosquittoBroker` runs the
Mosquitto binary as a child process (the embedded default broker when ``broker.url``
is empty); `render_acl` / `render_password_file` write Mosquitto files for a fleet;
`make_test_pki` creates throw-away TLS material.
`CommandService` answers commands on ``cmd/{name}``; `HomeAssistantDiscovery` announces
the room to Home Assistant.
"""

from agent.sync.acl import render_acl, render_password_file
from agent.sync.alerts import (
    ActiveAlert,
    AlertEngine,
    AlertEvent,
    Observation,
    Rule,
    Severity,
    default_rules,
)
from agent.sync.commands import CommandError, CommandService
from agent.sync.discovery import HomeAssistantDiscovery
from agent.sync.embedded_broker import BrokerError, BrokerTls, MosquittoBroker
from agent.sync.health import HealthReporter
from agent.sync.link import (
    LinkAuthError,
    LinkConfigError,
    LinkDown,
    LinkError,
    LinkStats,
    Message,
    MqttLink,
    Payload,
    PublishRejected,
    SubscribeRejected,
    Subscription,
)
from agent.sync.pki import CertPair, PkiMaterial, make_test_pki
from agent.sync.store import (
    Delivery,
    Outbox,
    OutboxError,
    ReliablePublisher,
    StoredMessage,
)
from agent.sync.system import ProcessMetrics, SystemMetrics
from agent.sync.topics import Topics

__all__ = [
    "ActiveAlert",
    "AlertEngine",
    "AlertEvent",
    "BrokerError",
    "BrokerTls",
    "CertPair",
    "CommandError",
    "CommandService",
    "Delivery",
    "HealthReporter",
    "HomeAssistantDiscovery",
    "LinkAuthError",
    "LinkConfigError",
    "LinkDown",
    "LinkError",
    "LinkStats",
    "Message",
    "MosquittoBroker",
    "MqttLink",
    "Observation",
    "Outbox",
    "OutboxError",
    "Payload",
    "PkiMaterial",
    "ProcessMetrics",
    "PublishRejected",
    "ReliablePublisher",
    "Rule",
    "Severity",
    "StoredMessage",
    "SubscribeRejected",
    "Subscription",
    "SystemMetrics",
    "Topics",
    "default_rules",
    "make_test_pki",
    "render_acl",
    "render_password_file",
]

"""The MQTT link to the fleet broker, and the embedded Mosquitto for demos and tests.

The rest of the agent uses `MqttLink` (one per agent: publish, subscribe, state,
stats), `Topics` (every topic name), the errors below and `HealthReporter` (periodic
telemetry over the link). `MosquittoBroker` runs the
Mosquitto binary as a child process (the embedded default broker when ``broker.url``
is empty); `render_acl` / `render_password_file` write Mosquitto files for a fleet;
`make_test_pki` creates throw-away TLS material.
"""

from agent.sync.acl import render_acl, render_password_file
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
from agent.sync.topics import Topics

__all__ = [
    "BrokerError",
    "BrokerTls",
    "CertPair",
    "HealthReporter",
    "LinkAuthError",
    "LinkConfigError",
    "LinkDown",
    "LinkError",
    "LinkStats",
    "Message",
    "MosquittoBroker",
    "MqttLink",
    "Payload",
    "PkiMaterial",
    "PublishRejected",
    "SubscribeRejected",
    "Subscription",
    "Topics",
    "make_test_pki",
    "render_acl",
    "render_password_file",
]

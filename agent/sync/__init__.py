"""The MQTT link to the fleet broker, and what rides on it.

The rest of the agent uses `MqttLink` (one per agent: publish, subscribe, state,
stats), `Topics` (every topic name), the errors below, `ReliablePublisher` over an
`Outbox` (QoS 1 store-and-forward in SQLite for alerts and events) and
`CommandService` (answers commands on ``cmd/{name}``). Fleet health lives in
``agent.health``; broker administration and the embedded Mosquitto in ``agent.broker``.
"""

from agent.sync.commands import (
    CommandError,
    CommandHandler,
    CommandService,
    callable_handler,
    ping_handler,
)
from agent.sync.link import MqttLink
from agent.sync.messages import (
    LinkAuthError,
    LinkConfigError,
    LinkDown,
    LinkError,
    LinkStats,
    Message,
    Payload,
    PublishRejected,
    SubscribeRejected,
)
from agent.sync.routing import Subscription
from agent.sync.store import (
    Delivery,
    Outbox,
    OutboxError,
    ReliablePublisher,
    StoredMessage,
)
from agent.sync.topics import Topics

__all__ = [
    "CommandError",
    "CommandHandler",
    "CommandService",
    "Delivery",
    "LinkAuthError",
    "LinkConfigError",
    "LinkDown",
    "LinkError",
    "LinkStats",
    "Message",
    "MqttLink",
    "Outbox",
    "OutboxError",
    "Payload",
    "PublishRejected",
    "ReliablePublisher",
    "StoredMessage",
    "SubscribeRejected",
    "Subscription",
    "Topics",
    "callable_handler",
    "ping_handler",
]

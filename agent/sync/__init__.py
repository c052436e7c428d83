"""The MQTT link to the fleet broker, and what rides on it.

The rest of the agent uses `MqttLink` (one per agent: publish, subscribe, state,
stats), `Topics` (every topic name), the errors below, `ReliablePublisher` over an
`Outbox` (QoS 1 store-and-forward in SQLite for alerts and events) and
`CommandService` (answers commands on ``cmd/{name}``), and the signed documents IT
pushes (`Envelope`, `Keyring`, `ProfileBook`: verified, persisted, answered). Fleet health lives in
``agent.health``; broker administration and the embedded Mosquitto in ``agent.broker``.
"""

from agent.sync.commands import (
    CommandError,
    CommandHandler,
    CommandService,
    callable_handler,
    ping_handler,
)
from agent.sync.envelope import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    KeyPair,
    Keyring,
    Reason,
    Rejected,
    Scope,
    check_time,
    device_layers,
    generate_key,
    key_id,
    layer_sort_key,
    load_private_key,
    load_public_keys,
    parse_envelope,
    public_key_text,
    sign,
    wave_bucket,
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
from agent.sync.profiles import (
    PROFILES_DIR,
    LayerReport,
    LayerState,
    ProfileBook,
    load_keyring,
    profiles_directory,
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
    "MAX_ENVELOPE_BYTES",
    "PROFILES_DIR",
    "CommandError",
    "CommandHandler",
    "CommandService",
    "Delivery",
    "Envelope",
    "KeyPair",
    "Keyring",
    "LayerReport",
    "LayerState",
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
    "ProfileBook",
    "PublishRejected",
    "Reason",
    "Rejected",
    "ReliablePublisher",
    "Scope",
    "StoredMessage",
    "SubscribeRejected",
    "Subscription",
    "Topics",
    "callable_handler",
    "check_time",
    "device_layers",
    "generate_key",
    "key_id",
    "layer_sort_key",
    "load_keyring",
    "load_private_key",
    "load_public_keys",
    "parse_envelope",
    "ping_handler",
    "profiles_directory",
    "public_key_text",
    "sign",
    "wave_bucket",
]

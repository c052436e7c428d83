"""The link's errors and small value types (what the rest of the agent handles)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

Payload = bytes | bytearray | str | Mapping[str, Any]


class LinkError(Exception):
    """Base class of the link's errors."""


class LinkDown(LinkError):
    """Not connected: a QoS > 0 publish could not be sent or acknowledged."""


class LinkConfigError(LinkError):
    """Configuration the link cannot work with (fatal; the CLI exits with code 2)."""


class LinkAuthError(LinkConfigError):
    """The broker refused this device's credentials before the link ever connected."""


class PublishRejected(LinkError):
    """The broker answered a QoS > 0 publish with a failure reason code (MQTT 5)."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        super().__init__(f"broker rejected publish to {topic!r}: {reason} (0x{reason_code:02X})")
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason


class SubscribeRejected(LinkError):
    """The broker refused a subscription (SUBACK failure reason code)."""


# -- small value types ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    retain: bool
    qos: int

    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ``ValueError`` if it is not JSON)."""
        return json.loads(self.payload)


@dataclass
class Traffic:
    """Figures that outlive one connection: each connection and subscription adds to the
    link's one instance, and `LinkStats` reports them."""

    published: int = 0
    dropped_messages: int = 0  # received, then dropped from a full subscription queue
    publish_rtt_ms: float | None = None  # last QoS 1 publish -> PUBACK
    ping_rtt_ms: float | None = None  # last PINGREQ -> PINGRESP


@dataclass(frozen=True)
class LinkStats:
    """A snapshot of the link's counters (for health telemetry)."""

    url: str
    connected: bool
    connected_since: str | None
    seq: int
    connect_attempts: int
    connects: int
    disconnects: int
    last_error: str | None
    published: int
    received: int
    dropped_publishes: int  # QoS 0 publishes dropped while disconnected
    dropped_messages: int  # received messages dropped by full subscription queues
    publish_rtt_ms: float | None  # last QoS 1 publish → PUBACK
    ping_rtt_ms: float | None  # last PINGREQ → PINGRESP

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_payload(payload: Payload) -> tuple[bytes, bool]:
    """``(bytes, is_json)``: dicts become compact UTF-8 JSON, str UTF-8."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload), False
    if isinstance(payload, str):
        return payload.encode("utf-8"), False
    if isinstance(payload, Mapping):
        try:
            text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"payload is not JSON-serialisable: {exc}") from exc
        return text.encode("utf-8"), True
    raise TypeError(f"payload must be bytes, str or a dict, not {type(payload).__name__}")

"""WebRTC signalling over the MQTT link: SDP offer/answer/bye between device ids.

Topic ``{prefix}/rtc/{from}/{to}`` (QoS 1, never retained); payload, compact JSON::

    {"v": 1, "lesson_id": "…", "type": "offer" | "answer" | "bye", "sdp": "v=0…"}

``sdp`` is the complete description after candidate gathering (aiortc does not
trickle), required for offers and answers and absent or null for ``bye``.

Every message is checked before anything acts on it, and a bad one is logged, counted
and dropped without touching the running lesson: at most ``MAX_MESSAGE_BYTES``, UTF-8
JSON, known fields of the right types, a well-formed topic addressed to this device,
not retained, and a ``lesson_id`` this device has opened with the sender among that
lesson's expected peers. The broker ACL lets a device publish only as
``rtc/{itself}/+``, so the ``from`` level is the sender's identity; the expected-peer
check is what keeps a room outside the group (or a stale session) out.

One :class:`Signalling` per agent subscribes to the device's inbox and routes messages
to the :class:`LessonInbox` that :meth:`Signalling.open` returned for their lesson.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.sync import Message, MqttLink

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
INBOX_SIZE = 32
_LESSON_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\.[a-z0-9][a-z0-9_-]{0,62}$")
_FIELDS = frozenset({"v", "lesson_id", "type", "sdp"})


class SignalType(StrEnum):
    OFFER = "offer"
    ANSWER = "answer"
    BYE = "bye"


class SignalRejected(ValueError):
    """A signalling message that fails validation: ``code`` for counters, text for logs."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True, slots=True)
class Signal:
    sender: str  # device id from the topic (bound to the publisher by the broker ACL)
    recipient: str
    lesson_id: str
    type: SignalType
    sdp: str | None


def is_device_id(value: str) -> bool:
    return bool(_DEVICE_ID.match(value))


def is_lesson_id(value: str) -> bool:
    return bool(_LESSON_ID.match(value))


def encode_signal(lesson_id: str, kind: SignalType, sdp: str | None = None) -> dict[str, Any]:
    if not is_lesson_id(lesson_id):
        raise ValueError(f"lesson id {lesson_id!r} is not valid")
    if (sdp is None) != (kind is SignalType.BYE):
        raise ValueError(f"{kind} {'needs' if sdp is None else 'takes no'} sdp")
    payload: dict[str, Any] = {"v": PROTOCOL_VERSION, "lesson_id": lesson_id, "type": str(kind)}
    if sdp is not None:
        payload["sdp"] = sdp
    return payload


def parse_signal(
    topic: str, payload: bytes, *, prefix: str, me: str, retained: bool = False
) -> Signal:
    """A validated `Signal`, or `SignalRejected` saying what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise SignalRejected("oversized", f"{len(payload)} bytes, more than {MAX_MESSAGE_BYTES}")
    levels = topic.split("/")
    if len(levels) != 4 or levels[0] != prefix or levels[1] != "rtc":
        raise SignalRejected("topic", f"not a signalling topic: {topic!r}")
    sender, recipient = levels[2], levels[3]
    if not is_device_id(sender):
        raise SignalRejected("topic", f"sender {sender[:80]!r} is not a device id")
    if recipient != me:
        raise SignalRejected("topic", f"addressed to {recipient[:80]!r}, not to {me}")
    if sender == me:
        raise SignalRejected("topic", "sent by this device to itself")
    if retained:
        raise SignalRejected(
            "retained", "retained (signalling is never retained: a stale or forged message)"
        )
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SignalRejected("json", f"not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise SignalRejected("json", "not a JSON object")
    unknown = set(data) - _FIELDS
    if unknown:
        raise SignalRejected("fields", f"unknown fields {sorted(str(k)[:40] for k in unknown)}")
    if data.get("v") != PROTOCOL_VERSION:
        raise SignalRejected("fields", f"protocol version {str(data.get('v'))[:20]!r}, expected 1")
    lesson_id = data.get("lesson_id")
    if not isinstance(lesson_id, str) or not is_lesson_id(lesson_id):
        raise SignalRejected("fields", "lesson_id missing or malformed")
    try:
        kind = SignalType(str(data.get("type")))
    except ValueError:
        raise SignalRejected(
            "fields", f"type {str(data.get('type'))[:20]!r} is not offer/answer/bye"
        ) from None
    sdp = data.get("sdp")
    if kind is SignalType.BYE:
        if sdp is not None:
            raise SignalRejected("fields", "bye carries no sdp")
    elif not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise SignalRejected("fields", f"{kind} without an SDP (a string starting 'v=0')")
    return Signal(sender, recipient, lesson_id, kind, sdp)


class LessonInbox:
    """Signals of one lesson from its expected peers, in arrival order (bounded)."""

    def __init__(self, owner: Signalling, lesson_id: str, peers: Iterable[str]) -> None:
        self.lesson_id = lesson_id
        self.peers = frozenset(peers)
        self._owner = owner
        self._queue: asyncio.Queue[Signal] = asyncio.Queue(INBOX_SIZE)
        self.dropped = 0

    def _put(self, signal: Signal) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            log.warning("signalling inbox of lesson %s is full: dropped the oldest", self.lesson_id)
        self._queue.put_nowait(signal)

    async def get(self) -> Signal:
        return await self._queue.get()

    def close(self) -> None:
        self._owner._close(self)

    def __enter__(self) -> LessonInbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Signalling:
    """The device's signalling endpoint: sends, and validates and routes what arrives.

    A supervisor service: ``run()`` holds the inbox subscription until cancelled.
    """

    name = "stream.signalling"

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.me = link.identity.device_id
        self._prefix = link.topics.prefix
        self._inboxes: dict[str, LessonInbox] = {}
        self._subscribed = asyncio.Event()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def open(self, lesson_id: str, peers: Iterable[str]) -> LessonInbox:
        """Accept signals for ``lesson_id`` from ``peers`` until the inbox is closed."""
        if not is_lesson_id(lesson_id):
            raise ValueError(f"lesson id {lesson_id!r} is not valid")
        inbox = LessonInbox(self, lesson_id, peers)
        old = self._inboxes.get(lesson_id)
        if old is not None:
            raise RuntimeError(f"lesson {lesson_id} already has an open inbox")
        self._inboxes[lesson_id] = inbox
        return inbox

    def _close(self, inbox: LessonInbox) -> None:
        if self._inboxes.get(inbox.lesson_id) is inbox:
            del self._inboxes[inbox.lesson_id]

    async def wait_ready(self) -> None:
        """Until the inbox subscription is in place (replies can no longer be missed)."""
        await self._subscribed.wait()

    async def send(self, to: str, lesson_id: str, kind: SignalType, sdp: str | None = None) -> None:
        """Publish one signal (QoS 1); raises the link's errors (LinkDown, PublishRejected)."""
        topic = self.link.topics.rtc(self.me, to)
        await self.link.publish(topic, encode_signal(lesson_id, kind, sdp), qos=1)

    async def run(self) -> None:
        try:
            async with self.link.subscribe(self.link.topics.rtc_inbox, qos=1) as messages:
                self._subscribed.set()
                async for message in messages:
                    self.deliver(message)
        finally:
            self._subscribed.clear()

    def deliver(self, message: Message) -> Signal | None:
        """Validate and route one received message; returns it if it was accepted."""
        try:
            signal = parse_signal(
                message.topic,
                message.payload,
                prefix=self._prefix,
                me=self.me,
                retained=message.retain,
            )
            inbox = self._inboxes.get(signal.lesson_id)
            if inbox is None and signal.type is SignalType.BYE:
                # The usual end of a lesson: the room left on the cleared announcement
                # before the main room's bye arrived. Nothing to do, nothing to warn about.
                self.rejected["stale"] += 1
                log.debug(
                    "bye from %s for lesson %s, already closed", signal.sender, signal.lesson_id
                )
                return None
            if inbox is None:
                raise SignalRejected("lesson", f"lesson {signal.lesson_id} is not open here")
            if signal.sender not in inbox.peers:
                raise SignalRejected(
                    "foreign",
                    f"{signal.sender} is not an expected peer of lesson {signal.lesson_id}",
                )
        except SignalRejected as exc:
            reason = str(exc)
            self.rejected[exc.code] += 1
            log.warning(
                "rejected signalling message on %s: %s",
                message.topic[:200],
                reason,
                extra={"fields": {"topic": message.topic[:200], "reason": reason}},
            )
            return None
        self.accepted += 1
        log.debug("signal %s from %s for lesson %s", signal.type, signal.sender, signal.lesson_id)
        inbox._put(signal)
        return signal

    def stats(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "open_lessons": len(self._inboxes),
        }

"""WebRTC signalling over the MQTT link: SDP offer/answer/bye and hands between rooms.

Topic ``{prefix}/rtc/{from}/{to}`` (QoS 1, never retained); payload, compact JSON::

    {"v": 1, "lesson_id": "…", "type": "offer" | "answer" | "bye" | "hand",
     "attempt": "k3X9_a2Q", "sdp": "v=0…", "up": true}

``sdp`` is the complete description after candidate gathering (aiortc does not
trickle), required for offers and answers and absent or null otherwise. ``attempt``
(optional, ``[A-Za-z0-9_-]{1,32}``) names one joining attempt: the receiving room puts
a fresh one in every offer, the main room echoes it in its answer and in a ``bye``
that ends that session, so neither side acts on a late answer or bye of an earlier
attempt. A message without it means "whatever session is current" (older agents).
``up`` (a boolean, ``hand`` only) raises or lowers a receiving room's hand; the main
room sends ``up: false`` when the teacher lowers it.

Every message is checked before anything acts on it, and a bad one is logged (the
first per sender and reason at WARNING, repeats summarised once a minute, see
:class:`RejectionLog`), counted and dropped without touching the running lesson: at
most ``MAX_MESSAGE_BYTES``, UTF-8 JSON, known fields of the right types, a well-formed
topic addressed to this device, not retained, and a ``lesson_id`` this device has
opened with the sender among that lesson's expected peers. The broker ACL lets a
device publish only as ``rtc/{itself}/+``, so the ``from`` level is the sender's
identity; the expected-peer check is what keeps a room outside the group (or a stale
session) out.

One :class:`Signalling` per agent subscribes to the device's inbox and routes messages
to the :class:`LessonInbox` that :meth:`Signalling.open` returned for their lesson.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent import contracts
from agent.logs import REJECTION_KEYS, RejectionLog
from agent.sync import Message, MqttLink

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
INBOX_SIZE = 32
_ATTEMPT = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_FIELDS = frozenset({"v", "lesson_id", "type", "sdp", "attempt", "up"})
# The patterns are the contracts' (one definition for every layer), named here too.
is_device_id = contracts.is_device_id
is_lesson_id = contracts.is_lesson_id


class SignalType(StrEnum):
    OFFER = "offer"
    ANSWER = "answer"
    BYE = "bye"
    HAND = "hand"  # a receiving room raises/lowers its hand (the main room only lowers)


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
    attempt: str | None = None  # the joining attempt (None: an older agent, "current")
    up: bool | None = None  # hand raised (HAND only)


def is_attempt_id(value: str) -> bool:
    return bool(_ATTEMPT.match(value))


def new_attempt_id() -> str:
    """A short random id for one joining attempt (8 URL-safe characters)."""
    return secrets.token_urlsafe(6)


def _needs_sdp(kind: SignalType) -> bool:
    return kind in (SignalType.OFFER, SignalType.ANSWER)


def encode_signal(
    lesson_id: str,
    kind: SignalType,
    sdp: str | None = None,
    *,
    attempt: str | None = None,
    up: bool | None = None,
) -> dict[str, Any]:
    if not is_lesson_id(lesson_id):
        raise ValueError(f"lesson id {lesson_id!r} is not valid")
    if (sdp is not None) != _needs_sdp(kind):
        raise ValueError(f"{kind} {'takes no' if sdp is not None else 'needs'} sdp")
    if (up is not None) != (kind is SignalType.HAND):
        raise ValueError(f"{kind} {'takes no' if up is not None else 'needs'} 'up'")
    if attempt is not None and not is_attempt_id(attempt):
        raise ValueError(f"attempt {attempt!r} is not valid")
    payload: dict[str, Any] = {"v": PROTOCOL_VERSION, "lesson_id": lesson_id, "type": str(kind)}
    if attempt is not None:
        payload["attempt"] = attempt
    if sdp is not None:
        payload["sdp"] = sdp
    if up is not None:
        payload["up"] = up
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
            "fields", f"type {str(data.get('type'))[:20]!r} is not offer/answer/bye/hand"
        ) from None
    attempt = data.get("attempt")
    if attempt is not None and (not isinstance(attempt, str) or not is_attempt_id(attempt)):
        raise SignalRejected("fields", "attempt malformed (1-32 of A-Z a-z 0-9 _ -)")
    sdp = data.get("sdp")
    if not _needs_sdp(kind):
        if sdp is not None:
            raise SignalRejected("fields", f"{kind} carries no sdp")
    elif not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise SignalRejected("fields", f"{kind} without an SDP (a string starting 'v=0')")
    up = data.get("up")
    if kind is SignalType.HAND:
        if not isinstance(up, bool):
            raise SignalRejected("fields", "hand without a boolean 'up'")
    elif up is not None:
        raise SignalRejected("fields", f"{kind} carries no 'up'")
    return Signal(sender, recipient, lesson_id, kind, sdp, attempt, up)


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
            self._owner.rejections.note(
                signal.sender,
                "inbox-full",
                f"inbox of lesson {self.lesson_id} full: dropped the oldest",
            )
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
        self.rejected: Counter[str] = Counter()  # by code
        self.rejected_from: Counter[str] = Counter()  # by sender (bounded, see _count)
        self.rejections = RejectionLog(log, "rejected signalling message")

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

    async def send(
        self,
        to: str,
        lesson_id: str,
        kind: SignalType,
        sdp: str | None = None,
        *,
        attempt: str | None = None,
        up: bool | None = None,
    ) -> None:
        """Publish one signal (QoS 1); raises the link's errors (LinkDown, PublishRejected)."""
        topic = self.link.topics.rtc(self.me, to)
        payload = encode_signal(lesson_id, kind, sdp, attempt=attempt, up=up)
        await self.link.publish(topic, payload, qos=1)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._summarise(), name="stream-signalling-summaries")
                async with self.link.subscribe(self.link.topics.rtc_inbox, qos=1) as messages:
                    self._subscribed.set()
                    async for message in messages:
                        self.deliver(message)
        finally:
            self._subscribed.clear()

    async def _summarise(self) -> None:
        """Write the rejection summaries of a flood that has stopped."""
        while True:
            await asyncio.sleep(max(1.0, self.rejections.window_s / 6))
            self.rejections.flush()

    def _count(self, sender: str, code: str) -> None:
        self.rejected[code] += 1
        if sender in self.rejected_from or len(self.rejected_from) < REJECTION_KEYS:
            self.rejected_from[sender] += 1
        else:
            self.rejected_from["(others)"] += 1

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
            if inbox is None and signal.type in (SignalType.BYE, SignalType.HAND):
                # The usual end of a lesson: the room left on the cleared announcement
                # before the main room's bye (or a hand) arrived. Nothing to warn about.
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
            sender = _sender_of(message.topic)
            self._count(sender, exc.code)
            self.rejections.note(
                sender,
                exc.code,
                f"{exc} (on {message.topic[:200]})",
                fields={"topic": message.topic[:200]},
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
            "rejected_from": dict(self.rejected_from.most_common(20)),
            "rejections_logged": self.rejections.logged,
            "rejections_suppressed": self.rejections.suppressed,
            "open_lessons": len(self._inboxes),
        }


def _sender_of(topic: str) -> str:
    """The sender level of a signalling topic, printable and short, for logs and counters."""
    levels = topic.split("/")
    sender = levels[2] if len(levels) >= 3 else "?"
    return sender if is_device_id(sender) else repr(sender[:40])

"""The lesson announcement: the retained ``{prefix}/lesson/{group}`` payload.

The main room publishes it when the teacher starts a lesson and clears it when the lesson
ends (``docs/contracts.md``); receiving rooms join what it names. Nobody trusts it: a
payload that fails `Announcement.parse` is `AnnouncementInvalid`, and when two main rooms
announce one group, `precedes` picks the lesson that stands, the same way everywhere.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.stream.signalling import (
    is_device_id,
    is_lesson_id,
)

log = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES = 16 * 1024
BYE_TIMEOUT_S = 2.0  # how long a room waits to say bye before it closes


class LessonConflict(RuntimeError):
    """Another main room already runs a lesson in this group (the text names it)."""


def precedes(a: Announcement, b: Announcement) -> bool:
    """Which of two live lessons of one group stands: the earlier start, then the lower
    device id. Both main rooms and every receiving room apply the same rule, so a
    misconfigured second main room never splits a group."""
    return (a.started_at, a.main) < (b.started_at, b.main)


class AnnouncementInvalid(ValueError):
    """A lesson announcement that fails validation (the text says why)."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """The retained ``{prefix}/lesson/{group}`` payload (contracts v1)."""

    lesson_id: str
    group: str
    main: str
    expected: tuple[str, ...]
    subject: str = ""
    joined: tuple[str, ...] = ()
    started_at: float = field(default_factory=time.time)
    state: str = "live"

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "lesson_id": self.lesson_id,
            "group": self.group,
            "subject": self.subject,
            "main": self.main,
            "expected": list(self.expected),
            "joined": list(self.joined),
            "started_at": round(self.started_at, 3),
            "state": self.state,
        }

    @classmethod
    def parse(cls, group: str, payload: bytes) -> Announcement | None:
        """The announcement, None for an empty payload (lesson ended), or
        `AnnouncementInvalid`."""
        if not payload:
            return None
        if len(payload) > MAX_ANNOUNCEMENT_BYTES:
            raise AnnouncementInvalid(f"{len(payload)} bytes, more than {MAX_ANNOUNCEMENT_BYTES}")
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AnnouncementInvalid("not UTF-8 JSON") from None
        if not isinstance(data, dict) or data.get("v") != 1:
            raise AnnouncementInvalid("not a version 1 announcement object")

        def text(name: str, default: str | None = None) -> str:
            value = data.get(name, default)
            if not isinstance(value, str):
                raise AnnouncementInvalid(f"{name} must be a string")
            return value

        def devices(name: str) -> tuple[str, ...]:
            value = data.get(name, [])
            if not isinstance(value, list) or not all(
                isinstance(v, str) and is_device_id(v) for v in value
            ):
                raise AnnouncementInvalid(f"{name} must be a list of device ids")
            return tuple(value)

        lesson_id, main = text("lesson_id"), text("main")
        if not is_lesson_id(lesson_id):
            raise AnnouncementInvalid("lesson_id is malformed")
        if not is_device_id(main):
            raise AnnouncementInvalid("main is not a device id")
        if text("group") != group:
            raise AnnouncementInvalid(f"group {data.get('group')!r} is not the topic's {group!r}")
        started = data.get("started_at", 0.0)
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise AnnouncementInvalid("started_at must be a number")
        return cls(
            lesson_id=lesson_id,
            group=group,
            main=main,
            expected=devices("expected"),
            subject=text("subject", "")[:200],
            joined=devices("joined"),
            started_at=float(started),
            state=text("state"),
        )


def new_lesson_id() -> str:
    return uuid.uuid4().hex[:16]

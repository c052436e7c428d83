"""The lesson announcement: the retained ``{prefix}/lesson/{group}`` payload.

The main room publishes it when the teacher starts a lesson and clears it when the lesson
ends (``docs/contracts.md``); receiving rooms join what it names. Nobody trusts it: a
payload that fails `Announcement.parse` is `AnnouncementInvalid`, and when two main rooms
announce one group, `precedes` picks the lesson that stands, the same way everywhere.
The type itself is the contract in `agent.contracts` (the dashboard reads it too); this
module adds what only the stream needs.
"""

from __future__ import annotations

import uuid

from agent.contracts import Announcement, AnnouncementInvalid, precedes

__all__ = [
    "BYE_TIMEOUT_S",
    "Announcement",
    "AnnouncementInvalid",
    "LessonConflict",
    "new_lesson_id",
    "precedes",
]

BYE_TIMEOUT_S = 2.0  # how long a room waits to say bye before it closes


class LessonConflict(RuntimeError):
    """Another main room already runs a lesson in this group (the text names it)."""


def new_lesson_id() -> str:
    return uuid.uuid4().hex[:16]

"""The room's own privacy switches: the teacher mutes the camera or the microphone.

One :class:`MediaControls` per room, shared by everything that sends this room's media
(the shared encoder and every peer's audio track), so a mute applies to every room
and every viewer at once, and a room that joins while muted never sees a frame.
Muting replaces the media instead of stopping it: peers keep their connection and
timing, and the receiving screen shows "camera off" rather than a frozen picture.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class MediaControls:
    camera_muted: bool = False
    microphone_muted: bool = False
    changed_at: float = field(default_factory=time.time)
    _listeners: list[Callable[[MediaControls], None]] = field(default_factory=list, repr=False)

    def set(
        self, *, camera_muted: bool | None = None, microphone_muted: bool | None = None
    ) -> None:
        changed = False
        if camera_muted is not None and camera_muted != self.camera_muted:
            self.camera_muted = camera_muted
            changed = True
        if microphone_muted is not None and microphone_muted != self.microphone_muted:
            self.microphone_muted = microphone_muted
            changed = True
        if changed:
            self.changed_at = time.time()
            for listener in list(self._listeners):
                listener(self)

    def on_change(self, listener: Callable[[MediaControls], None]) -> None:
        self._listeners.append(listener)

    def to_dict(self) -> dict[str, bool]:
        return {"camera_muted": self.camera_muted, "microphone_muted": self.microphone_muted}

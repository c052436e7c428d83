"""Structured logging for maintenance staff: key=value text for people, JSON for journald.

Call sites log with %-style arguments and put machine-readable context in
``extra={"fields": {...}}``; both formats carry it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", None) or {})
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key != "fields":
            fields[key] = value
    return fields


class TextFormatter(logging.Formatter):
    """``2026-11-24T08:00:00Z INFO agent.capture: camera lost device=/dev/video0``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}Z {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items())
        if extra:
            line = f"{line} {extra}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; journald and log shippers index the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup_logging(
    level: str = "info", fmt: Literal["text", "json"] = "text", stream: Any = None
) -> None:
    """Configure the root logger once for the process (the CLI calls this)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter that maintenance staff cannot act on.
    for noisy in ("aioice", "aiortc", "libav", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# -- rejections from the network: logged, never a flood -------------------------------

REJECTION_WINDOW_S = 60.0
REJECTION_KEYS = 256  # (sender, code) windows kept; a flood of new senders evicts the oldest


@dataclass(slots=True)
class _Window:
    opened: float
    suppressed: int = 0


class RejectionLog:
    """Logs rejections so that a misbehaving sender cannot flood the journal.

    The first rejection per (sender, code) logs at WARNING and opens a ``window_s``
    window; repeats inside it are only counted. The count is summarised ("... and 37
    more from X in the last 60 s") by :meth:`flush` once the window has passed, or
    with the next rejection after it. At most ``max_keys`` windows are kept (the
    oldest is summarised and dropped first), so many senders cannot grow it either.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        window_s: float = REJECTION_WINDOW_S,
        max_keys: int = REJECTION_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.what = what
        self.window_s = window_s
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self.logged = 0
        self.suppressed = 0

    def note(
        self, sender: str, code: str, text: str, *, fields: dict[str, Any] | None = None
    ) -> bool:
        """Record one rejection; True if it was logged, False if only counted."""
        key = (sender, code)
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.opened < self.window_s:
            window.suppressed += 1
            self.suppressed += 1
            return False
        if window is not None:
            self._summarise(key, window)
            del self._windows[key]
        elif len(self._windows) >= self.max_keys:
            self.flush()
            if len(self._windows) >= self.max_keys:
                oldest = next(iter(self._windows))
                self._summarise(oldest, self._windows.pop(oldest))
        self._windows[key] = _Window(now)
        self.logged += 1
        extra = {"fields": {"sender": sender, "code": code, "reason": text, **(fields or {})}}
        self._log.warning("%s from %s: %s", self.what, sender, text, extra=extra)
        return True

    def flush(self) -> None:
        """Summarise and forget the windows that have passed."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            if now - window.opened >= self.window_s:
                self._summarise(key, window)
                del self._windows[key]

    def _summarise(self, key: tuple[str, str], window: _Window) -> None:
        if window.suppressed:
            sender, code = key
            self._log.warning(
                "... and %d more %ss (%s) from %s in the last %.0f s",
                window.suppressed,
                self.what,
                code,
                sender,
                self.window_s,
                extra={"fields": {"sender": sender, "code": code, "count": window.suppressed}},
            )

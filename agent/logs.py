"""Structured logging for maintenance staff: key=value text for people, JSON for journald.

Call sites log with %-style arguments and put machine-readable context in
``extra={"fields": {...}}``; both formats carry it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
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

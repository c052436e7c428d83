"""Structured logs: people read key=value text, journald indexes JSON fields."""

from __future__ import annotations

import io
import json
import logging

import pytest

from agent.logs import setup_logging


@pytest.fixture
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_carry_message_and_fields() -> None:
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("agent.capture").warning(
        "camera %s lost", "/dev/video0", extra={"fields": {"room": "s1.r1", "retry_s": 1.5}}
    )
    logging.getLogger("agent.capture").debug("not shown at info")
    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "agent.capture"
    assert entry["msg"] == "camera /dev/video0 lost"
    assert (entry["room"], entry["retry_s"]) == ("s1.r1", 1.5)


@pytest.mark.usefixtures("restore_root_logger")
def test_text_lines_are_key_value_and_include_tracebacks() -> None:
    out = io.StringIO()
    setup_logging("debug", "text", stream=out)
    try:
        raise ValueError("bad frame")
    except ValueError:
        logging.getLogger("agent.x").exception(
            "reader failed", extra={"fields": {"reason": "two words"}}
        )
    text = out.getvalue()
    first = text.splitlines()[0]
    assert first.endswith('ERROR   agent.x: reader failed reason="two words"')
    assert "ValueError: bad frame" in text

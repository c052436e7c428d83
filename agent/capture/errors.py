"""Capture errors: each message names the config field a person should fix."""

from __future__ import annotations


class CaptureError(Exception):
    """A camera, microphone or media file cannot be used (message names the config field)."""


class ReadInterruptedError(CaptureError):
    """A paced read was woken early because its hub is stopping."""

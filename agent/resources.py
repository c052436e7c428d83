"""Where the files the agent ships beside its code are, in a checkout and once installed.

Hardware profiles, JSON Schemas and the fleet broker's Mosquitto config stay at the top of
the source tree (``firmware-profiles/``, ``schemas/``, ``broker/``), where people look for
them. ``agent/shipped/`` holds one link to each, so the same package-relative path works
from a source checkout (``pip install -e``) and from an installed wheel, which carries the
linked files as package data. Shipping another top-level folder is one more link there.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(name: str) -> Path:
    """The shipped folder ``name`` (e.g. ``"firmware-profiles"``), from any working directory."""
    # A plain directory package (never a zip): files() is a real path, found through the
    # package itself rather than the current directory.
    return Path(str(resources.files("agent") / "shipped" / name))

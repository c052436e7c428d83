"""Configuration: typed models, layered loading, hardware profiles.

The one entry point is ``load_config``; everything after it uses the typed
``AgentConfig``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from agent.config.errors import ConfigError, ConfigIssue
from agent.config.loader import DEFAULTS_LAYER, Layer, LoadedConfig, build_config, file_layer
from agent.config.models import AgentConfig, BrokerConfig, IdentityConfig, LessonRole
from agent.config.profiles import (
    HardwareProfile,
    HostFacts,
    available_profiles,
    detect_profile,
    load_profile,
    load_profile_file,
)

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "ConfigError",
    "ConfigIssue",
    "HardwareProfile",
    "HostFacts",
    "IdentityConfig",
    "Layer",
    "LessonRole",
    "LoadedConfig",
    "available_profiles",
    "load_config",
    "load_profile_file",
]


def load_config(
    site_files: Sequence[Path],
    *,
    profile: str | None = None,
    pushed: Layer | None = None,
    facts: HostFacts | None = None,
) -> LoadedConfig:
    """Build the effective config: defaults < hardware profile < site files < pushed profile.

    ``profile`` (e.g. from the command line) beats ``hardware.profile`` in the site files;
    'auto' detects the kit from DMI and USB ids. ``pushed`` is the layer IT pushes over
    MQTT (signed and persisted by the sync package).
    """
    site_layers = [file_layer(path) for path in site_files]
    chosen = profile
    reason = "named on the command line"
    if chosen is None:
        chosen, reason = "auto", "default"
        for layer in site_layers:
            hardware = layer.data.get("hardware")
            if isinstance(hardware, dict) and isinstance(hardware.get("profile"), str):
                chosen, reason = hardware["profile"], f"named in {layer.name}"
    if chosen == "auto":
        candidates = []
        for _name, path in available_profiles().items():
            try:
                candidates.append(load_profile_file(path).profile)
            except ConfigError:
                continue  # a broken profile cannot match; `config check` reports it
        detection = detect_profile(facts or HostFacts.read(), candidates)
        chosen, reason = detection.name, f"auto-detected: {detection.reason}"
    hardware_layer = load_profile(chosen).layer()
    layers = [Layer(DEFAULTS_LAYER, {}), hardware_layer, *site_layers]
    if pushed is not None:
        layers.append(pushed)
    loaded = build_config(layers)
    return dataclasses.replace(loaded, profile=chosen, profile_reason=reason)

"""Configuration: typed models, layered loading, hardware profiles.

The one entry point is ``load_config`` (``sources.py``, with the site files and
command-line options it reads); everything after it uses the typed ``AgentConfig``.
"""

from __future__ import annotations

from agent.config.base import StrictModel
from agent.config.errors import ConfigError, ConfigIssue, issues_from_validation
from agent.config.loader import Layer, LoadedConfig, build_config, read_yaml_file
from agent.config.models import (
    BROKER_URL_PATTERN,
    DEVICE_ID_PATTERN,
    SLUG_PATTERN,
    UI_LANGUAGE_DESCRIPTION,
    AgentConfig,
    AudioConfig,
    BrokerConfig,
    CaptureConfig,
    HealthConfig,
    IceServerConfig,
    IdentityConfig,
    LessonRole,
    PlaybackConfig,
    StreamConfig,
    UiConfig,
    UiLanguage,
    VideoConfig,
)
from agent.config.profiles import (
    HardwareProfile,
    HostFacts,
    available_profiles,
    check_profile_file,
    detect_profile,
    load_profile,
    load_profile_file,
)
from agent.config.sources import ConfigSources, add_config_options, load_config

__all__ = [
    "BROKER_URL_PATTERN",
    "DEVICE_ID_PATTERN",
    "SLUG_PATTERN",
    "UI_LANGUAGE_DESCRIPTION",
    "AgentConfig",
    "AudioConfig",
    "BrokerConfig",
    "CaptureConfig",
    "ConfigError",
    "ConfigIssue",
    "ConfigSources",
    "HardwareProfile",
    "HealthConfig",
    "HostFacts",
    "IceServerConfig",
    "IdentityConfig",
    "Layer",
    "LessonRole",
    "LoadedConfig",
    "PlaybackConfig",
    "StreamConfig",
    "StrictModel",
    "UiConfig",
    "UiLanguage",
    "VideoConfig",
    "add_config_options",
    "available_profiles",
    "build_config",
    "check_profile_file",
    "detect_profile",
    "issues_from_validation",
    "load_config",
    "load_profile",
    "load_profile_file",
    "read_yaml_file",
]

"""Configuration: typed models, layered loading, hardware profiles.

The one entry point is ``load_config`` (``sources.py``, with the site files and
command-line options it reads); everything after it uses the typed ``AgentConfig``.
"""

from __future__ import annotations

from agent.config.audio_processing import AudioProcessingConfig
from agent.config.base import StrictModel
from agent.config.errors import (
    ConfigError,
    ConfigIssue,
    ForbiddenProfileKeys,
    issues_from_validation,
)
from agent.config.link import LinkConfig
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
from agent.config.pushed import FORBIDDEN_PROFILE_KEYS, ProfilesConfig
from agent.config.sensing import SensingConfig, period_minutes
from agent.config.sources import (
    DEFAULT_SITE_FILE,
    ConfigSources,
    add_broker_client_options,
    add_config_options,
    broker_client_fields,
    load_config,
    profile_layer,
)

__all__ = [
    "BROKER_URL_PATTERN",
    "DEFAULT_SITE_FILE",
    "DEVICE_ID_PATTERN",
    "FORBIDDEN_PROFILE_KEYS",
    "SLUG_PATTERN",
    "UI_LANGUAGE_DESCRIPTION",
    "AgentConfig",
    "AudioConfig",
    "AudioProcessingConfig",
    "BrokerConfig",
    "CaptureConfig",
    "ConfigError",
    "ConfigIssue",
    "ConfigSources",
    "ForbiddenProfileKeys",
    "HardwareProfile",
    "HealthConfig",
    "HostFacts",
    "IceServerConfig",
    "IdentityConfig",
    "Layer",
    "LessonRole",
    "LinkConfig",
    "LoadedConfig",
    "PlaybackConfig",
    "ProfilesConfig",
    "SensingConfig",
    "StreamConfig",
    "StrictModel",
    "UiConfig",
    "UiLanguage",
    "VideoConfig",
    "add_broker_client_options",
    "add_config_options",
    "available_profiles",
    "broker_client_fields",
    "build_config",
    "check_profile_file",
    "detect_profile",
    "issues_from_validation",
    "load_config",
    "load_profile",
    "load_profile_file",
    "period_minutes",
    "profile_layer",
    "read_yaml_file",
]

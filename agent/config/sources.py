"""Where the effective config comes from: the site files, the hardware profile named on
the command line, and (with the profiles work) the layer IT pushed, persisted on disk.

Both command lines (``classroom-agent`` and its ``lesson`` command) and the daemon's
reload read the config through `ConfigSources`, so the layers are assembled one way.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config.errors import ConfigError
from agent.config.loader import DEFAULTS_LAYER, Layer, LoadedConfig, build_config, file_layer
from agent.config.profiles import (
    HostFacts,
    available_profiles,
    detect_profile,
    load_profile,
    load_profile_file,
)


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


DEFAULT_SITE_FILE = Path("/etc/classroom-agent/agent.yaml")
PUSHED_FILE_NAME = "pushed-profile.json"  # under supervisor.state_dir, once profiles land


def site_files(given: Sequence[Path] | None) -> list[Path]:
    """The site files named on the command line, else the default one if it exists."""
    if given:
        return list(given)
    if DEFAULT_SITE_FILE.exists():
        return [DEFAULT_SITE_FILE]
    raise ConfigError.single("", f"no site file: pass --config FILE or create {DEFAULT_SITE_FILE}")


@dataclass(frozen=True)
class ConfigSources:
    """The inputs of one agent's config; `load` builds the effective config from them."""

    site_files: tuple[Path, ...]
    profile: str | None = None  # a hardware profile named on the command line
    pushed: Layer | None = None  # the verified layer IT pushed (none yet)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConfigSources:
        return cls(tuple(site_files(args.config)), args.profile)

    def load(self) -> LoadedConfig:
        return load_config(self.site_files, profile=self.profile, pushed=self.pushed)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config/-c`` (repeatable) and ``--profile``, the same on every command."""
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        action="append",
        help=f"site file (repeatable, later wins; default {DEFAULT_SITE_FILE})",
    )
    parser.add_argument("--profile", help="hardware profile name (default: from config, or auto)")

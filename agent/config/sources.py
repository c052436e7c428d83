"""Where the effective config comes from: the site files, the hardware profile named on
the command line, and (with the profiles work) the layer IT pushed, persisted on disk.

Both command lines (``classroom-agent`` and its ``lesson`` command) and the daemon's
reload read the config through `ConfigSources`, so the layers are assembled one way.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config import load_config
from agent.config.errors import ConfigError
from agent.config.loader import Layer, LoadedConfig

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

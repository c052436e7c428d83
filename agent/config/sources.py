"""Where the effective config comes from: the site files, the hardware profile named on
the command line, and the profiles IT pushed (verified, persisted, one layer per scope).

Both command lines (``classroom-agent`` and its ``lesson`` command) and the daemon's
reload read the config through `ConfigSources`, so the layers are assembled one way.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.errors import ConfigError, ConfigIssue, ForbiddenProfileKeys
from agent.config.loader import (
    DEFAULTS_LAYER,
    Layer,
    LoadedConfig,
    build_config,
    file_layer,
    parse_yaml,
)
from agent.config.profiles import (
    HostFacts,
    available_profiles,
    detect_profile,
    load_profile,
    load_profile_file,
)
from agent.config.pushed import FORBIDDEN_PROFILE_KEYS


def load_config(
    site_files: Sequence[Path],
    *,
    profile: str | None = None,
    pushed: Sequence[Layer] = (),
    facts: HostFacts | None = None,
) -> LoadedConfig:
    """Build the effective config: defaults < hardware profile < site files < pushed layers.

    ``profile`` (e.g. from the command line) beats ``hardware.profile`` in the site files;
    'auto' detects the kit from DMI and USB ids. ``pushed`` are the profiles IT pushed over
    MQTT, verified and in scope order (fleet < school < group < room).
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
    layers.extend(pushed)
    loaded = build_config(layers)
    return dataclasses.replace(loaded, profile=chosen, profile_reason=reason)


DEFAULT_SITE_FILE = Path("/etc/classroom-agent/agent.yaml")


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
    pushed: tuple[Layer, ...] = ()  # the verified profiles IT pushed, in scope order

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


def _paths(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        paths.append(path)
        if isinstance(value, Mapping):
            paths.extend(_paths(value, path))
    return paths


def profile_layer(name: str, payload: bytes) -> Layer:
    """A verified profile's payload (YAML or JSON) as a config layer.

    `ConfigError` names each problem: not a mapping of sections, or a key a profile may
    not set. Field values are checked with the other layers (`build_config`).
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError.single("", "the profile is not UTF-8 text", name) from None
    data, lines = parse_yaml(text, name)
    forbidden = [
        path
        for path in _paths(data)
        if any(path == key or path.startswith(key + ".") for key in FORBIDDEN_PROFILE_KEYS)
    ]
    if forbidden:
        raise ForbiddenProfileKeys(
            [
                ConfigIssue(
                    path,
                    "a pushed profile may not set this (identity, the pinned keys and the "
                    "state directory come from the site file only); remove it",
                    name,
                )
                for path in forbidden
                if not any(path.startswith(other + ".") for other in forbidden)
            ]
        )
    return Layer(name=name, data=data, lines=lines)


def add_broker_client_options(
    parser: argparse.ArgumentParser, *, default_url: str | None, user_help: str
) -> None:
    """The fleet broker and this tool's credentials, the same on every tool that connects
    as a person rather than as a device (dashboard, profile push and status)."""
    parser.add_argument(
        "--broker",
        default=default_url,
        required=default_url is None,
        help="fleet broker URL, mqtt://host:1883 or mqtts://host:8883"
        + (f" (default {default_url})" if default_url else ""),
    )
    parser.add_argument("--prefix", default="edu", help="topic prefix (default edu)")
    parser.add_argument("--username", help=user_help)
    parser.add_argument("--password-file", type=Path, help="file holding that user's password")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate of the broker (mqtts://)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="its private key")


def broker_client_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``broker`` section those options describe (validated by the caller's model)."""
    broker: dict[str, Any] = {"url": args.broker, "topic_prefix": args.prefix}
    if args.username:
        broker["username"] = args.username
    if args.password_file:
        broker["password_file"] = args.password_file
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls: dict[str, Any] = {"ca_file": args.tls_ca}
        if args.tls_cert or args.tls_key:
            tls.update(cert_file=args.tls_cert, key_file=args.tls_key)
        broker["tls"] = tls
    return broker

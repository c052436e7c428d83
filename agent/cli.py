"""``classroom-agent``: run the daemon, check and show config, list devices, run the demo.

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from agent import __version__
from agent.broker import add_broker_parser
from agent.config import (
    AgentConfig,
    ConfigError,
    ConfigSources,
    HostFacts,
    LoadedConfig,
    add_config_options,
    available_profiles,
    check_profile_file,
    detect_profile,
    load_config,
    load_profile_file,
    read_yaml_file,
)
from agent.dashboard import add_dashboard_parser
from agent.panel import add_lesson_parser
from agent.runtime import add_profile_parser
from agent.sensing import add_report_parser, add_sensing_commands

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
SECRET_KEYS = ("password", "credential")


def _load(args: argparse.Namespace) -> LoadedConfig:
    return ConfigSources.from_args(args).load()


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        rows: list[tuple[str, Any]] = []
        for key, item in value.items():
            rows.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    return [(prefix, value)]


def _effective(config: AgentConfig) -> dict[str, Any]:
    data: dict[str, Any] = config.model_dump(mode="json")
    return data


def cmd_config_check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            data, _ = read_yaml_file(path)
            if "config" in data and "name" in data:
                profile = check_profile_file(path)
                print(f"{path}: ok (hardware profile {profile.name})")
            else:
                loaded = load_config([path], profile=args.profile)
                ident = loaded.config.identity
                print(f"{path}: ok (room {ident.device_id}, hardware profile {loaded.profile})")
        except ConfigError as exc:
            failed = True
            for issue in exc.issues:
                print(f"{path}: {issue}", file=sys.stderr)
    return EXIT_CONFIG if failed else EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    from agent.runtime import load_with_profiles

    loaded = _load(args)
    try:  # with the profiles IT pushed, as the daemon runs it
        loaded = load_with_profiles(ConfigSources.from_args(args))[0]
    except PermissionError as exc:
        print(f"# pushed profiles not shown: {exc}", file=sys.stderr)
    effective = _effective(loaded.config)
    if args.format == "yaml":
        print(yaml.safe_dump(_masked(effective), sort_keys=False), end="")
        return EXIT_OK
    print(f"# hardware profile: {loaded.profile} ({loaded.profile_reason})")
    print(f"# layers, later wins: {' < '.join(loaded.layers)}")
    rows = _flatten(_masked(effective))
    width = max(len(path) for path, _ in rows)
    for path, value in rows:
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{path:<{width}}  {shown:<28}  [{loaded.source_of(path)}]")
    return EXIT_OK


def _masked(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if any(secret in key for secret in SECRET_KEYS) and value and not key.endswith("_file"):
        return "********"
    return value


def cmd_profiles(args: argparse.Namespace) -> int:
    facts = HostFacts.read()
    profiles = []
    for _name, path in available_profiles().items():
        try:
            profiles.append(load_profile_file(path))
        except ConfigError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
    detection = detect_profile(facts, [p.profile for p in profiles])
    for loaded in profiles:
        marker = "*" if loaded.profile.name == detection.name else " "
        print(f"{marker} {loaded.profile.name:<22} {loaded.profile.description}")
    print(f"\nthis machine: {detection.name} ({detection.reason})")
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    from agent.capture import list_devices

    inventory = list_devices()
    if args.json:
        print(json.dumps(inventory.to_dict(), indent=2))
        return EXIT_OK
    print(inventory.describe())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.logs import setup_logging
    from agent.runtime import load_with_profiles, run_daemon

    site = _load(args)  # a bad site file is reported before anything else happens
    log_cfg = site.config.logging
    setup_logging(args.log_level or log_cfg.level, args.log_format or log_cfg.format)
    loaded, sources, book = load_with_profiles(ConfigSources.from_args(args))
    return run_daemon(loaded, sources, book)


def cmd_selftest(args: argparse.Namespace) -> int:
    from agent.health import run_selftest_cli
    from agent.logs import setup_logging
    from agent.stream import open_playback

    loaded = _load(args)
    setup_logging("warning")
    # The room's loudspeakers, for the echo-path check (none: the check is skipped).
    playback = loaded.config.stream.playback
    return run_selftest_cli(
        loaded, json_output=args.json, open_speaker=lambda: open_playback(playback)
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo
    from agent.logs import setup_logging

    setup_logging("warning")
    return run_demo(
        rooms=args.rooms,
        duration_s=args.duration,
        workdir=args.workdir,
        dashboard_port=args.dashboard_port,
        language=args.language,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classroom-agent", description=f"Classroom Edge Agent (version {__version__})"
    )
    parser.add_argument("--version", action="version", version=f"classroom-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    with_config = add_config_options

    run = sub.add_parser("run", help="run the daemon")
    with_config(run)
    run.add_argument("--log-format", choices=["text", "json"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="check or show configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate site files or hardware profiles")
    check.add_argument("files", type=Path, nargs="+")
    check.add_argument("--profile", help="hardware profile to check site files against")
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="effective config, with where each value came from")
    with_config(show)
    show.add_argument("--format", choices=["table", "yaml"], default="table")
    show.set_defaults(func=cmd_config_show)

    profiles = sub.add_parser("profiles", help="list hardware profiles and the detected one")
    profiles.set_defaults(func=cmd_profiles)

    devices = sub.add_parser("devices", help="list cameras (with modes) and microphones")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=cmd_devices)

    selftest = sub.add_parser(
        "selftest", help="pre-class check: camera, microphone, disk, clock, broker"
    )
    with_config(selftest)
    selftest.add_argument("--json", action="store_true")
    selftest.set_defaults(func=cmd_selftest)

    add_broker_parser(sub)
    add_dashboard_parser(sub)
    add_lesson_parser(sub)
    add_profile_parser(sub)
    add_sensing_commands(sub)
    add_report_parser(sub)

    demo = sub.add_parser("demo", help="run a demo fleet on an embedded broker")
    demo.add_argument("--rooms", type=int, default=3, help="rooms to start (1-8)")
    demo.add_argument("--duration", type=float, default=0, help="seconds to run (0: until Ctrl-C)")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files here")
    demo.add_argument(
        "--dashboard-port",
        type=int,
        default=8480,
        help="maintenance dashboard port on 127.0.0.1 (a free one if taken)",
    )
    demo.add_argument(
        "--language",
        choices=("zh-CN", "en", "auto"),
        default="zh-CN",
        help="the rooms' ui.language: their pages and the lesson report (default zh-CN)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"config error: {issue}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `classroom-agent config show | head`
        sys.stderr.close()
        return EXIT_OK
    finally:
        logging.shutdown()
    return result


if __name__ == "__main__":
    sys.exit(main())

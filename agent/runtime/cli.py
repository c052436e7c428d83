"""``classroom-agent profile ...``: IT's tools for signed config profiles.

keygen, sign and verify work offline; plan and history read a device's own files; push,
clear and status talk to the fleet broker as an IT (admin) user of the fleet ACL.
Exit codes: 0 ok, 1 a broker or file problem, 2 a refused document or bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import re
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import (
    AgentConfig,
    BrokerConfig,
    ConfigError,
    ConfigSources,
    IdentityConfig,
    Layer,
    add_broker_client_options,
    add_config_options,
    broker_client_fields,
    build_config,
    profile_layer,
)
from agent.contracts import FleetTopics
from agent.runtime.composition import PARTS, Inputs, plan
from agent.runtime.profiles import load_with_profiles, open_book, pushed_layers
from agent.sync import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    Keyring,
    LinkError,
    MqttLink,
    Reason,
    Rejected,
    Scope,
    check_time,
    device_layers,
    generate_key,
    layer_sort_key,
    load_private_key,
    load_public_keys,
    parse_envelope,
    public_key_text,
    sign,
    wave_bucket,
)

EXIT_OK, EXIT_FAILURE, EXIT_REFUSED = 0, 1, 2
BROKER_WAIT_S = 10.0
CLEARED_PAYLOAD = b"{}\n"  # a profile that sets nothing
STATUS_SETTLE_S = 0.6  # retained messages arrive right after subscribing; then quiet


def _duration(text: str) -> dt.timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number and s, m, h or d (e.g. 30d)")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fail(message: str, code: int = EXIT_REFUSED) -> int:
    print(f"profile: {message}", file=sys.stderr)
    return code


def _read_envelope(path: Path) -> Envelope:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Rejected(Reason.MALFORMED, f"{path}: {exc.strerror or exc}") from None
    return parse_envelope(data)


# -- keygen, sign, verify -------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    pair = generate_key(args.out)
    print(pair.key_id)
    print(f"private key: {args.out / (pair.key_id + '.key')} (keep it offline, mode 0600)")
    print(f"public key:  {args.out / (pair.key_id + '.pub')}")
    print(f"pin it in a site file under profiles.trusted_keys: {public_key_text(pair.public)}")
    return EXIT_OK


def _check_config_payload(payload: bytes, label: str) -> None:
    """Refuse at signing time what every device would refuse: forbidden keys, bad values
    (`ConfigError` with the field paths, as a device reports them)."""
    probe = Layer("a room to check against", {"identity": {"site": "check", "room": "check"}})
    build_config([probe, profile_layer(label, payload)])


def cmd_sign(args: argparse.Namespace) -> int:
    try:
        payload = args.profile.read_bytes()
    except OSError as exc:
        return _fail(f"{args.profile}: {exc.strerror or exc}", EXIT_FAILURE)
    try:
        scope = Scope.parse(args.scope)
        keys = [load_private_key(path) for path in args.key]
    except ValueError as exc:
        return _fail(str(exc))
    if args.type == "config" and not args.no_check:
        try:
            _check_config_payload(payload, str(args.profile))
        except ConfigError as exc:
            return _fail("; ".join(str(i) for i in exc.issues) + " (no devices would apply it)")
    if args.type == "keys" and len(keys) < 2:
        return _fail("a keys document needs --key at least twice (the threshold of pinned keys)")
    try:
        envelope = sign(
            payload,
            payload_type=args.type,
            scope=scope,
            version=args.version,
            keys=keys,
            expires_in=args.expires,
            wave=args.wave,
            check_s=args.check_s,
        )
    except ValueError as exc:
        return _fail(str(exc))
    data = envelope.to_json()
    if len(data) > MAX_ENVELOPE_BYTES:
        return _fail(f"the signed document is {len(data)} bytes; the limit is {MAX_ENVELOPE_BYTES}")
    args.out.write_bytes(data)
    wave = f", wave {envelope.wave}%" if envelope.wave else ""
    print(
        f"signed {envelope.describe()}{wave} with {', '.join(envelope.key_ids)}; expires "
        f"{_when(envelope.expires_at)} -> {args.out}"
    )
    return EXIT_OK


def _payload_keys(envelope: Envelope) -> list[str]:
    if envelope.payload_type != "config":
        return []
    try:
        layer = profile_layer("profile", envelope.payload)
    except ConfigError:
        return []
    keys: list[str] = []

    def walk(data: Mapping[str, Any], prefix: str) -> None:
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                walk(value, path)
            else:
                keys.append(path)

    walk(layer.data, "")
    return keys


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        trusted = load_public_keys(args.trust)
    except ValueError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    try:
        envelope = _read_envelope(args.signed)
        ring = Keyring(trusted, threshold=args.threshold)
        if envelope.payload_type == "keys":
            signers = ring.verify_threshold(envelope)
        else:
            signers = [ring.verify_single(envelope)]
        check_time(envelope, dt.datetime.now(dt.UTC).timestamp(), args.max_skew, "this machine")
    except Rejected as exc:
        return _fail(f"refused: {exc}")
    print(f"valid: {envelope.payload_type} document signed by {', '.join(signers)}")
    print(f"scope:    {envelope.scope}")
    print(f"version:  {envelope.version}")
    print(f"issued:   {_when(envelope.issued_at)}")
    print(f"expires:  {_when(envelope.expires_at)}")
    print(f"wave:     {f'{envelope.wave}%' if envelope.wave else 'all devices'}")
    print(f"check:    {envelope.check_s} s")
    print(f"payload:  {', '.join(_payload_keys(envelope)) or '(not a config profile)'}")
    return EXIT_OK


# -- plan and history (on the device) -------------------------------------------------------------


class _InPlace:
    """Stands in for a running part that takes its config in place (for `plan`)."""

    in_place: tuple[str, ...] = ()

    def reconfigure(self, config: AgentConfig) -> None:
        del config


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def cmd_plan(args: argparse.Namespace) -> int:
    sources = ConfigSources.from_args(args)
    current, sources, book = load_with_profiles(sources)
    try:
        envelope = _read_envelope(args.signed)
    except Rejected as exc:
        return _fail(f"refused: {exc}")
    device = current.config.identity.device_id
    layers = [layer for layer in envelope.scope.layers() if layer in book.layers]
    if not layers:
        return _fail(f"refused: {envelope.describe()} does not include this device ({device})")
    layer = layers[0]
    try:
        book.verify(layer, envelope.raw)
    except Rejected as exc:
        return _fail(f"this device would refuse it: {exc}")
    if not book.in_wave(envelope):
        bucket = wave_bucket(device, envelope.scope)
        print(
            f"{device} is not in the {envelope.wave}% wave (its place: {bucket:.1f}); it would "
            "report 'waiting'"
        )
    try:
        pushed = pushed_layers(book, layer, envelope)
        candidate = dataclasses.replace(sources, pushed=pushed).load()
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"this device would refuse it: {issue}", file=sys.stderr)
        return EXIT_REFUSED
    before = _flatten(current.config.model_dump(mode="json"))
    after = _flatten(candidate.config.model_dump(mode="json"))
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    print(f"{envelope.describe()} on {device} (layer {layer}):")
    if not changed:
        print("  the effective config does not change")
    for path in changed:
        print(f"  {path}: {json.dumps(before.get(path))} -> {json.dumps(after.get(path))}")
    objects = {part.name: _InPlace() for part in PARTS if part.in_place}
    url = None if current.config.broker.url else "embedded"
    new_url = None if candidate.config.broker.url else "embedded"
    change = plan(
        Inputs(current.config, url, current.profile),
        Inputs(candidate.config, new_url, candidate.profile),
        objects,
    )
    print(f"services: {change.describe()}")
    if change.live:
        print(
            f"a live lesson would delay it until the lesson ends (it restarts "
            f"{', '.join(change.live)})"
        )
    else:
        print("a live lesson would not delay it")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    loaded = ConfigSources.from_args(args).load()
    book = open_book(loaded)
    entries = book.read_history()
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        print("no pushed profile has arrived on this device yet")
    for entry in entries:
        version = entry.get("version")
        print(
            f"{entry.get('time')}  {entry.get('layer'):<24} "
            f"{'v' + str(version) if version else '-':<6} {entry.get('state'):<12} "
            f"{entry.get('reason', '')}"
        )
    return EXIT_OK


# -- push, clear, status (on the broker) ----------------------------------------------------------


def _broker(args: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig.model_validate(broker_client_fields(args))


def _link(args: argparse.Namespace) -> MqttLink:
    return MqttLink(
        _broker(args),
        IdentityConfig(site="it", room=f"profile-{uuid.uuid4().hex[:8]}"),
        software_version=__version__,
        profile_name="it",
        announce=False,
    )


async def _with_link(args: argparse.Namespace, work: Any) -> Any:
    link = _link(args)
    runner = asyncio.create_task(link.run(), name="profile-cli-link")
    try:
        waiter = asyncio.create_task(link.wait_connected(BROKER_WAIT_S))
        done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            waiter.cancel()
            runner.result()  # raises the link's error
        await waiter
        return await work(link)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _collect(link: MqttLink, filters: Iterable[str]) -> dict[str, bytes]:
    """Every retained message under ``filters`` (the broker sends them on subscribe)."""
    found: dict[str, bytes] = {}

    async def read(topic_filter: str) -> None:
        async with link.subscribe(topic_filter, qos=1, maxsize=100000) as messages:
            async for message in messages:
                if message.payload:
                    found[message.topic] = message.payload

    tasks = [asyncio.create_task(read(f)) for f in filters]
    try:
        count = -1
        while count != len(found):  # quiet for a moment: the retained burst is over
            count = len(found)
            await asyncio.sleep(STATUS_SETTLE_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return found


def _reports(found: Mapping[str, bytes], fleet: FleetTopics) -> dict[str, dict[str, Any]]:
    reports = {}
    reported_re = re.compile(rf"^{re.escape(fleet.prefix)}/([^/]+)/([^/]+)/config/reported$")
    for topic, payload in found.items():
        match = reported_re.match(topic)
        if not match:
            continue
        try:
            document = json.loads(payload)
        except ValueError:
            continue
        if isinstance(document, dict):
            reports[f"{match.group(1)}.{match.group(2)}"] = document
    return reports


def _devices(found: Mapping[str, bytes], fleet: FleetTopics) -> set[str]:
    state_re = re.compile(rf"^{re.escape(fleet.prefix)}/([^/]+)/([^/]+)/state$")
    return {f"{m.group(1)}.{m.group(2)}" for t in found if (m := state_re.match(t))}


def status_rows(
    scope: Scope | None,
    devices: set[str],
    reports: Mapping[str, dict[str, Any]],
    desired: Mapping[str, Envelope],
) -> list[dict[str, Any]]:
    """One row per device and layer in ``scope`` (every layer when None)."""
    rows = []
    for device in sorted(devices | set(reports)):
        report = reports.get(device, {})
        groups = report.get("groups", [])
        if scope is not None and not scope.includes(device, groups):
            continue
        layers_reported: Mapping[str, Any] = report.get("layers", {})
        mine = device_layers(device, groups)
        if scope is not None:
            wanted = [lay for lay in scope.layers() if lay in mine]
        else:
            wanted = sorted(
                set(layers_reported) | {lay for lay in desired if lay in mine},
                key=layer_sort_key,
            )
        for layer in wanted:
            entry = layers_reported.get(layer)
            target = desired.get(layer)
            row: dict[str, Any] = {
                "device": device,
                "layer": layer,
                "desired_version": target.version if target else None,
            }
            if entry is None or (target is not None and entry.get("version") != target.version):
                row.update(
                    state="pending",
                    version=None,
                    reason="",
                    since=None,
                    applied_version=(entry or {}).get("applied_version"),
                )
                if not report:
                    row["reason"] = "no report from this device yet"
            else:
                row.update(
                    state=entry.get("state"),
                    version=entry.get("version"),
                    reason=entry.get("reason", ""),
                    since=entry.get("since"),
                    applied_version=entry.get("applied_version"),
                )
            rows.append(row)
    return rows


def _desired(found: Mapping[str, bytes], fleet: FleetTopics) -> dict[str, Envelope]:
    desired = {}
    for topic, payload in found.items():
        layer = fleet.layer_of_desired(topic)
        if layer is None:
            continue
        try:
            desired[layer] = parse_envelope(payload)
        except Rejected:
            continue
    return desired


def _status_filters(fleet: FleetTopics) -> list[str]:
    return [
        fleet.state_all,
        fleet.config_reported_all,
        fleet.config_desired_all,
        f"{fleet.prefix}/fleet/#",
    ]


def cmd_push(args: argparse.Namespace) -> int:
    try:
        envelope = _read_envelope(args.signed)
    except Rejected as exc:
        return _fail(f"refused: {exc}")
    fleet = FleetTopics(args.prefix)
    topics = (
        [fleet.config_keys]
        if envelope.payload_type == "keys"
        else [fleet.config_desired_for(layer) for layer in envelope.scope.layers()]
    )

    async def work(link: MqttLink) -> int:
        if envelope.payload_type == "config" and not args.force:
            found = await _collect(link, _status_filters(fleet))
            current = _desired(found, fleet)
            for layer in envelope.scope.layers():
                old = current.get(layer)
                if old is None:
                    continue
                if old.version >= envelope.version:
                    return _fail(
                        f"{layer} already has v{old.version}; devices would refuse "
                        f"v{envelope.version} as a replay (sign a higher version)"
                    )
                widening = (envelope.wave or 100) > (old.wave or 100)
                if widening:
                    rows = status_rows(
                        old.scope, _devices(found, fleet), _reports(found, fleet), current
                    )
                    bad = [
                        r
                        for r in rows
                        if r["layer"] == layer and r["state"] in ("rejected", "rolled-back")
                    ]
                    if bad:
                        names = ", ".join(f"{r['device']} ({r['state']})" for r in bad)
                        return _fail(
                            f"the current wave of {layer} (v{old.version}, "
                            f"{old.wave or 100}%) has failures: {names}; fix them or "
                            "push with --force"
                        )
        for topic in topics:
            await link.publish(topic, envelope.raw, qos=1, retain=True)
            print(f"pushed {envelope.describe()} to {topic} (retained)")
        return EXIT_OK

    return _run(args, work)


def cmd_clear(args: argparse.Namespace) -> int:
    """A signed empty profile: the layer then sets nothing, and the rooms fall back to
    their other layers (an unsigned empty message would let anyone clear a layer)."""
    try:
        scope = Scope.parse(args.scope)
        keys = [load_private_key(args.key)]
        envelope = sign(
            CLEARED_PAYLOAD,
            payload_type="config",
            scope=scope,
            version=args.version,
            keys=keys,
            expires_in=args.expires,
        )
    except ValueError as exc:
        return _fail(str(exc))
    fleet = FleetTopics(args.prefix)

    async def work(link: MqttLink) -> int:
        for layer in scope.layers():
            topic = fleet.config_desired_for(layer)
            await link.publish(topic, envelope.raw, qos=1, retain=True)
            print(
                f"cleared {layer} with a signed empty profile v{envelope.version} on {topic}: "
                "devices fall back to their other layers"
            )
        return EXIT_OK

    return _run(args, work)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        scope = Scope.parse(args.scope) if args.scope else None
    except ValueError as exc:
        return _fail(str(exc))
    fleet = FleetTopics(args.prefix)

    async def work(link: MqttLink) -> int:
        found = await _collect(link, _status_filters(fleet))
        rows = status_rows(
            scope, _devices(found, fleet), _reports(found, fleet), _desired(found, fleet)
        )
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        if not rows:
            print("no devices in this scope have reported")
            return EXIT_OK
        print(f"{'device':<24} {'layer':<22} {'state':<12} {'version':<8} {'since':<25} reason")
        for row in rows:
            version = row["version"] if row["version"] is not None else "-"
            print(
                f"{row['device']:<24} {row['layer']:<22} {row['state']:<12} {version!s:<8} "
                f"{(row['since'] or '-'):<25} {row['reason']}"
            )
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        print("  ".join(f"{state}: {n}" for state, n in sorted(counts.items())))
        return EXIT_OK

    return _run(args, work)


def _run(args: argparse.Namespace, work: Any) -> int:
    try:
        result: int = asyncio.run(_with_link(args, work))
    except (LinkError, TimeoutError) as exc:
        return _fail(f"broker {args.broker}: {exc or 'no connection'}", EXIT_FAILURE)
    return result


# -- the parser -----------------------------------------------------------------------------------


def add_profile_parser(sub: Any) -> None:
    parser = sub.add_parser("profile", help="signed config profiles pushed by IT")
    cmds = parser.add_subparsers(dest="profile_command", required=True)

    keygen = cmds.add_parser("keygen", help="make an IT signing key pair")
    keygen.add_argument("--out", type=Path, required=True, help="directory for KEYID.key/.pub")
    keygen.set_defaults(func=cmd_keygen)

    signer = cmds.add_parser("sign", help="sign a profile (or a keys document)")
    signer.add_argument("profile", type=Path, help="the profile: a partial site file (YAML/JSON)")
    signer.add_argument(
        "--key",
        type=Path,
        action="append",
        required=True,
        help="private key file (twice or more for a keys document)",
    )
    signer.add_argument(
        "--scope",
        required=True,
        help="fleet, school:SITE, group:GROUP, room:SITE.ROOM[,SITE.ROOM...]",
    )
    signer.add_argument(
        "--version",
        type=int,
        required=True,
        help="higher than every earlier version for this scope",
    )
    signer.add_argument(
        "--expires",
        type=_duration,
        default=_duration("30d"),
        help="valid for this long (e.g. 12h, 30d; default 30d)",
    )
    signer.add_argument("--wave", type=int, help="percent of the scope's devices (1-100)")
    signer.add_argument(
        "--check-s",
        type=int,
        default=30,
        help="how long devices check what the change touched before keeping it",
    )
    signer.add_argument("--type", choices=["config", "keys", "roster"], default="config")
    signer.add_argument(
        "--no-check",
        action="store_true",
        help="do not validate the profile against the config schema",
    )
    signer.add_argument("--out", type=Path, required=True, help="the signed JSON document")
    signer.set_defaults(func=cmd_sign)

    verify = cmds.add_parser("verify", help="check a signed document against public keys")
    verify.add_argument("signed", type=Path)
    verify.add_argument(
        "--trust", type=Path, nargs="+", required=True, help=".pub files or directories of them"
    )
    verify.add_argument("--threshold", type=int, default=2, help="for keys documents")
    verify.add_argument("--max-skew", type=float, default=300, help="seconds of clock skew")
    verify.set_defaults(func=cmd_verify)

    planner = cmds.add_parser("plan", help="what a signed profile would change on this device")
    planner.add_argument("signed", type=Path)
    add_config_options(planner)
    planner.set_defaults(func=cmd_plan)

    push = cmds.add_parser("push", help="publish a signed document, retained, on its scope")
    push.add_argument("signed", type=Path)
    add_broker_client_options(push, default_url=None, user_help="an IT (admin) user")
    push.add_argument(
        "--force", action="store_true", help="widen a wave even though the current one has failures"
    )
    push.set_defaults(func=cmd_push)

    clear = cmds.add_parser("clear", help="remove a scope's profile (devices fall back)")
    clear.add_argument("scope")
    clear.add_argument("--key", type=Path, required=True, help="private key file")
    clear.add_argument(
        "--version", type=int, required=True, help="higher than the scope's current version"
    )
    clear.add_argument(
        "--expires",
        type=_duration,
        default=_duration("365d"),
        help="how long the clearing holds (default 365d)",
    )
    add_broker_client_options(clear, default_url=None, user_help="an IT (admin) user")
    clear.set_defaults(func=cmd_clear)

    status = cmds.add_parser("status", help="every device's answer, per scope")
    status.add_argument("--scope", help="only this scope (default: every layer)")
    add_broker_client_options(status, default_url=None, user_help="an IT user or a reader")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    history = cmds.add_parser("history", help="this device's audit log of pushed profiles")
    add_config_options(history)
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_history)

"""Fleet broker credentials: a CA, one certificate + password per client, the ACL.

``classroom-agent broker ...`` (or ``python -m agent.broker.credentials ...``) manages a
broker directory, by default ``/etc/mosquitto/classroom`` (the paths the shipped
``broker/mosquitto.conf`` reads)::

    ca.pem  ca.key          the fleet CA (created once; keep ca.key offline if you can)
    server.pem  server.key  the broker's certificate, for its host names / addresses
    fleet.yaml              the inventory: devices with their lesson groups, IT admins,
                            dashboard readers (edited by hand; the tool never rewrites it)
    passwd                  Mosquitto password file ($7$ hashes)
    acl                     generated from fleet.yaml by `agent.broker.acl.render_acl`
    clients/{name}/         what to copy to one client: ca.pem, client.pem, client.key,
                            password (and broker.yaml, a config snippet, for devices)

Commands: ``init`` (CA, server certificate, an example fleet.yaml), ``add NAME``
(certificate, random password, password file, ACL; run again to rotate), ``remove
NAME`` (password and ACL entry gone: the certificate alone is not a login), ``acl``
(regenerate after editing fleet.yaml), ``config`` (the shipped mosquitto.conf with other
paths or port). Then ``systemctl reload mosquitto``.

Why one certificate *and* one password per client: the broker requires both (see
``broker/mosquitto.conf``), so a certificate copied off a stolen mini-PC is useless once
its password is removed, without running a CRL. Keys are ECDSA P-256, written 0600;
files the broker must read are group-readable by ``mosquitto`` when that group exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.broker.acl import hash_password, render_acl
from agent.broker.pki import CertPair, make_ca, sign_certificate, write_cert, write_key
from agent.config import SLUG_PATTERN, IdentityConfig
from agent.health import HA_DISCOVERY_PREFIX
from agent.resources import shipped

DEFAULT_DIR = Path("/etc/mosquitto/classroom")
SHIPPED_CONFIG = shipped("broker") / "mosquitto.conf"
CONFIG_DIR_IN_TEMPLATE = "/etc/mosquitto/classroom"
ORGANIZATION = "Classroom Edge Agent fleet"
CA_DAYS = 3650
CLIENT_DAYS = 825  # what browsers accept for leaf certificates; rotate with `add` again
PASSWORD_BYTES = 24

_EXAMPLE_INVENTORY = """\
# The fleet: who may connect to the broker, and what each may do.
# Edit, then: classroom-agent broker acl DIR && systemctl reload mosquitto
prefix: edu                     # broker.topic_prefix of the agents
home_assistant: homeassistant   # discovery prefix; null if no Home Assistant
url: mqtts://{host}:8883         # written into each device's broker.yaml snippet
devices:
  - site: central-school
    room: room-101
    groups:
      - {{group: g5-english, role: main, receivers: [rural-point-1.room-1]}}
  - site: rural-point-1
    room: room-1
    groups:
      - {{group: g5-english, role: receiving}}
admins: [it]                    # read and write everything (config pushes, commands)
readers: [dashboard]            # read everything, write nothing (dashboards, Home Assistant)
"""


class CredentialsError(Exception):
    """Something the operator must fix (the message says what)."""


class FleetInventory(BaseModel):
    """``fleet.yaml``: the devices (as in their agent.yaml ``identity``) and the roles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="edu", pattern=SLUG_PATTERN, description="Topic prefix")
    home_assistant: str | None = Field(
        default=HA_DISCOVERY_PREFIX, description="Home Assistant discovery prefix, or null"
    )
    url: str | None = Field(default=None, description="Broker URL for device snippets")
    devices: list[IdentityConfig] = Field(default_factory=list)
    admins: list[str] = Field(default_factory=lambda: ["it"])
    readers: list[str] = Field(default_factory=lambda: ["dashboard"])

    @field_validator("admins", "readers")
    @classmethod
    def _plain_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or any(c in name for c in ":#+/ ") or "." in name:
                raise ValueError(
                    f"{name!r}: role users are plain names (no ':', '#', '+', '/', spaces or "
                    "'.'; a '.' would make them look like a device)"
                )
        return names

    def role_of(self, name: str) -> str | None:
        if any(device.device_id == name for device in self.devices):
            return "device"
        if name in self.admins:
            return "admin"
        if name in self.readers:
            return "reader"
        return None

    def device(self, name: str) -> IdentityConfig | None:
        return next((d for d in self.devices if d.device_id == name), None)


@dataclass(frozen=True)
class ClientBundle:
    """What `add_client` wrote for one client."""

    name: str
    role: str
    directory: Path
    cert: CertPair
    ca_cert: Path
    password_file: Path
    password: str


# -- files ------------------------------------------------------------------------------


def _broker_group() -> int | None:
    """The ``mosquitto`` group's id when we can hand files to it (root on a broker host)."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return None


def _for_broker(path: Path, *, secret: bool) -> None:
    """Let the broker read ``path``: secrets 0640 root:mosquitto, the rest 0644."""
    gid = _broker_group()
    if gid is not None:
        os.chown(path, 0, gid)
    path.chmod(0o640 if secret and gid is not None else (0o600 if secret else 0o644))


def _write_text(path: Path, text: str, *, secret: bool) -> None:
    # Created with the final mode: never briefly readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def load_inventory(directory: Path) -> FleetInventory:
    path = directory / "fleet.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise CredentialsError(
            f"{path} does not exist: run `classroom-agent broker init {directory}` first"
        ) from None
    except yaml.YAMLError as exc:
        raise CredentialsError(f"{path}: not valid YAML ({exc})") from None
    try:
        inventory = FleetInventory.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise CredentialsError(f"{path}: {problems}") from None
    names = [d.device_id for d in inventory.devices] + inventory.admins + inventory.readers
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CredentialsError(f"{path}: listed more than once: {', '.join(duplicates)}")
    return inventory


# -- certificates -----------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CredentialsError(
            f"{exc.filename} is missing: run `classroom-agent broker init {directory}` (or "
            "copy the CA here) first"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{directory / 'ca.key'} is not an ECDSA key")
    return cert, key


def create_ca(
    directory: Path, *, common_name: str = f"{ORGANIZATION} CA", now: dt.datetime | None = None
) -> Path:
    """Create ``ca.pem`` + ``ca.key`` once; refuses to replace an existing CA."""
    if (directory / "ca.key").exists() or (directory / "ca.pem").exists():
        raise CredentialsError(
            f"{directory} already has a CA; replacing it would lock out every device"
        )
    now = now or dt.datetime.now(dt.UTC)
    cert, key = make_ca(
        common_name,
        now,
        name=_name(common_name),
        backdate=dt.timedelta(hours=1),
        valid_for=dt.timedelta(days=CA_DAYS),
    )
    write_key(directory / "ca.key", key)
    write_cert(directory / "ca.pem", cert)
    (directory / "ca.pem").chmod(0o644)
    return directory / "ca.pem"


def issue_certificate(
    directory: Path,
    common_name: str,
    out: Path,
    *,
    server_names: Sequence[str] = (),
    days: int = CLIENT_DAYS,
    now: dt.datetime | None = None,
) -> CertPair:
    """A certificate of the fleet CA in ``out``.pem / ``out``.key.

    ``server_names`` (host names and IP addresses) make it a server certificate;
    without them it is a client certificate with CN = ``common_name``. ``now`` moves
    the validity window (tests issue expired certificates with it).
    """
    ca_cert, ca_key = _load_ca(directory)
    now = now or dt.datetime.now(dt.UTC)
    cert, key = sign_certificate(
        ca_cert,
        ca_key,
        common_name,
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=days),
        server_names=server_names,
        name=_name(common_name),
    )
    pair = CertPair(cert=out.with_suffix(".pem"), key=out.with_suffix(".key"))
    write_key(pair.key, key)
    write_cert(pair.cert, cert)
    pair.cert.chmod(0o644)
    return pair


# -- the broker directory ---------------------------------------------------------------


def init_broker_dir(
    directory: Path, *, server_names: Sequence[str], now: dt.datetime | None = None
) -> list[Path]:
    """CA (if absent), the broker's certificate, an example fleet.yaml and empty files.

    Returns the files written. Re-running with other ``server_names`` re-issues only the
    server certificate.
    """
    if not server_names:
        raise CredentialsError("give the broker's host name(s) or address(es), e.g. --host")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o750)
    gid = _broker_group()
    if gid is not None:
        os.chown(directory, 0, gid)
    written: list[Path] = []
    if not (directory / "ca.pem").exists():
        written.append(create_ca(directory, now=now))
    server = issue_certificate(
        directory, server_names[0], directory / "server", server_names=server_names, now=now
    )
    _for_broker(server.key, secret=True)
    written += [server.cert, server.key]
    inventory = directory / "fleet.yaml"
    if not inventory.exists():
        _write_text(inventory, _EXAMPLE_INVENTORY.format(host=server_names[0]), secret=False)
        written.append(inventory)
    for name in ("passwd", "acl"):
        path = directory / name
        if not path.exists():
            _write_text(path, "", secret=True)
            _for_broker(path, secret=True)
            written.append(path)
    written.append(write_acl(directory))
    return written


def write_acl(directory: Path) -> Path:
    """Regenerate ``acl`` from ``fleet.yaml`` (the only way the ACL should change)."""
    inventory = load_inventory(directory)
    try:
        text = render_acl(
            inventory.devices,
            prefix=inventory.prefix,
            admins=inventory.admins,
            readers=inventory.readers,
            discovery_prefix=inventory.home_assistant,
        )
    except ValueError as exc:
        raise CredentialsError(f"{directory / 'fleet.yaml'}: {exc}") from None
    path = directory / "acl"
    _write_text(path, text, secret=True)
    _for_broker(path, secret=True)
    return path


def _read_passwd(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                user, _, digest = line.partition(":")
                entries[user] = digest
    return entries


def _write_passwd(path: Path, entries: dict[str, str]) -> None:
    _write_text(path, "".join(f"{u}:{h}\n" for u, h in entries.items()), secret=True)
    _for_broker(path, secret=True)


def add_client(
    directory: Path,
    name: str,
    *,
    days: int = CLIENT_DAYS,
    now: dt.datetime | None = None,
    password: str | None = None,
) -> ClientBundle:
    """Certificate + random password for ``name`` (listed in fleet.yaml); updates passwd/acl.

    Running it again for the same name rotates both (the old password stops working at
    the broker's next reload).
    """
    inventory = load_inventory(directory)
    role = inventory.role_of(name)
    if role is None:
        raise CredentialsError(
            f"{name!r} is not in {directory / 'fleet.yaml'}: add it under devices (as "
            "site + room), admins or readers first"
        )
    bundle = directory / "clients" / name
    bundle.mkdir(parents=True, exist_ok=True)
    bundle.chmod(0o700)
    pair = issue_certificate(directory, name, bundle / "client", days=days, now=now)
    secret = password if password is not None else secrets.token_urlsafe(PASSWORD_BYTES)
    password_file = bundle / "password"
    _write_text(password_file, secret + "\n", secret=True)
    ca_copy = bundle / "ca.pem"
    ca_copy.write_bytes((directory / "ca.pem").read_bytes())
    entries = _read_passwd(directory / "passwd")
    entries[name] = hash_password(secret)
    _write_passwd(directory / "passwd", entries)
    write_acl(directory)
    identity = inventory.device(name)
    if identity is not None:
        _write_text(bundle / "broker.yaml", _device_snippet(inventory, identity), secret=False)
    return ClientBundle(name, role, bundle, pair, ca_copy, password_file, secret)


def _device_snippet(inventory: FleetInventory, identity: IdentityConfig) -> str:
    """The agent.yaml sections for this device, with the files in /etc/classroom-agent."""
    etc = "/etc/classroom-agent"
    data: dict[str, Any] = {
        "identity": identity.model_dump(mode="json", exclude_defaults=True),
        "broker": {
            "url": inventory.url or "mqtts://BROKER-HOST:8883",
            "topic_prefix": inventory.prefix,
            "password_file": f"{etc}/broker-password",
            "tls": {
                "ca_file": f"{etc}/ca.pem",
                "cert_file": f"{etc}/device.pem",
                "key_file": f"{etc}/device.key",
            },
        },
    }
    header = (
        f"# {identity.device_id}: install ca.pem, client.pem -> device.pem, client.key -> "
        f"device.key and password -> broker-password in {etc} (mode 0600, owner "
        "classroom-agent), then merge these sections into agent.yaml.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def remove_client(directory: Path, name: str) -> None:
    """Drop ``name``'s password (its certificate alone cannot log in) and regenerate the ACL.

    Remove it from fleet.yaml too, or `add` would accept it again.
    """
    entries = _read_passwd(directory / "passwd")
    if entries.pop(name, None) is None:
        raise CredentialsError(f"{name!r} has no password in {directory / 'passwd'}")
    _write_passwd(directory / "passwd", entries)
    write_acl(directory)


def render_broker_config(
    template: str,
    *,
    conf_dir: Path | None = None,
    data_dir: Path | None = None,
    port: int | None = None,
    bind: str | None = None,
    log_to_stderr: bool = False,
    pid_file: Path | None = None,
) -> str:
    """The shipped mosquitto.conf with other paths, port or logging (None: keep as is).

    Used for brokers whose files live elsewhere, and by the tests, which run the shipped
    configuration on a loopback port in a temporary directory.
    """
    lines: list[str] = []
    for original in template.splitlines():
        words = original.split()
        directive = words[0] if words and not original.startswith("#") else ""
        line = original
        if conf_dir is not None:
            line = line.replace(CONFIG_DIR_IN_TEMPLATE, str(conf_dir))
        if directive == "persistence_location" and data_dir is not None:
            line = f"persistence_location {data_dir}/"
        elif directive == "listener" and (port is not None or bind is not None):
            line = f"listener {port if port is not None else words[1]}"
            if bind is not None:
                line += f" {bind}"
        elif directive == "log_dest" and log_to_stderr:
            line = "log_dest stderr"
        elif directive == "pid_file" and pid_file is not None:
            line = f"pid_file {pid_file}"
        lines.append(line)
    return "\n".join(lines) + "\n"


# -- command line -----------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    names = [*args.host, *args.ip]
    for path in init_broker_dir(args.dir, server_names=names):
        out.write(f"wrote {path}\n")
    out.write(
        f"next: edit {args.dir / 'fleet.yaml'}, then `classroom-agent broker add {args.dir} "
        "NAME` for each device, admin and reader\n"
    )
    return 0


def _cmd_add(args: argparse.Namespace, out: TextIO) -> int:
    for name in args.names:
        bundle = add_client(args.dir, name, days=args.days)
        out.write(f"{bundle.name} ({bundle.role}): {bundle.directory}\n")
    out.write("then: systemctl reload mosquitto\n")
    return 0


def _cmd_remove(args: argparse.Namespace, out: TextIO) -> int:
    for name in args.names:
        remove_client(args.dir, name)
        out.write(f"removed {name}; also delete it from fleet.yaml\n")
    out.write("then: systemctl reload mosquitto\n")
    return 0


def _cmd_acl(args: argparse.Namespace, out: TextIO) -> int:
    out.write(f"wrote {write_acl(args.dir)}\nthen: systemctl reload mosquitto\n")
    return 0


def _cmd_config(args: argparse.Namespace, out: TextIO) -> int:
    try:
        template = args.template.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialsError(f"cannot read {args.template}: {exc.strerror or exc}") from None
    out.write(
        render_broker_config(
            template, conf_dir=args.dir, data_dir=args.data_dir, port=args.port, bind=args.bind
        )
    )
    return 0


def add_broker_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``broker`` and its subcommands to the CLI's subparsers.

    Each subcommand sets ``func`` to `run_broker_command`, so ``args.func(args)`` runs it.
    """
    broker: argparse.ArgumentParser = subparsers.add_parser(
        "broker", help="fleet broker credentials: CA, device certificates, passwords, ACL"
    )
    sub = broker.add_subparsers(dest="broker_command", required=True)

    def with_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "dir", type=Path, nargs="?", default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}"
        )

    init = sub.add_parser("init", help="create the CA, the broker certificate, fleet.yaml")
    with_dir(init)
    init.add_argument("--host", action="append", default=[], help="broker host name (repeat)")
    init.add_argument("--ip", action="append", default=[], help="broker IP address (repeat)")
    init.set_defaults(func=run_broker_command, broker_func=_cmd_init)

    add = sub.add_parser("add", help="certificate + password for names listed in fleet.yaml")
    add.add_argument("dir", type=Path, help="broker directory")
    add.add_argument("names", nargs="+", help="device ids (site.room), admin or reader names")
    add.add_argument("--days", type=int, default=CLIENT_DAYS, help="certificate validity")
    add.set_defaults(func=run_broker_command, broker_func=_cmd_add)

    remove = sub.add_parser("remove", help="revoke a client's password (and its ACL entry)")
    remove.add_argument("dir", type=Path, help="broker directory")
    remove.add_argument("names", nargs="+")
    remove.set_defaults(func=run_broker_command, broker_func=_cmd_remove)

    acl = sub.add_parser("acl", help="regenerate the ACL from fleet.yaml")
    with_dir(acl)
    acl.set_defaults(func=run_broker_command, broker_func=_cmd_acl)

    config = sub.add_parser("config", help="print the shipped mosquitto.conf, adapted")
    config.add_argument("--dir", type=Path, help="where the broker files are")
    config.add_argument("--data-dir", type=Path, help="persistence location")
    config.add_argument("--port", type=int, help="listener port (default 8883)")
    config.add_argument("--bind", help="listener address (default: all)")
    config.add_argument("--template", type=Path, default=SHIPPED_CONFIG)
    config.set_defaults(func=run_broker_command, broker_func=_cmd_config)
    return broker


def run_broker_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed ``broker`` subcommand: 0 ok, 2 with the problem on stderr."""
    stream = out if out is not None else sys.stdout
    try:
        code: int = args.broker_func(args, stream)
    except CredentialsError as exc:
        sys.stderr.write(f"broker: {exc}\n")
        return 2
    return code


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    *,
    prog: str = "python -m agent.broker.credentials",
) -> int:
    """``python -m agent.broker.credentials broker ...``, or the CLI's lazy pass-through."""
    parser = argparse.ArgumentParser(prog=prog)
    add_broker_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_broker_command(args, out)


if __name__ == "__main__":
    sys.exit(main())

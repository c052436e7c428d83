"""Mosquitto password and ACL files for a fleet: one user per device, least privilege.

The scheme (Mosquitto 2.0 ``acl_file`` syntax), for prefix ``edu`` and device
``school1.room1`` (site ``school1``, room ``room1``, main room of group ``music``):

.. code-block:: text

    user school1.room1
    topic write edu/school1/room1/state
    topic write edu/school1/room1/health
    topic write edu/school1/room1/alert
    topic write edu/school1/room1/sensing
    topic write edu/school1/room1/config/reported
    topic write edu/school1/room1/cmd/+/result
    topic read edu/school1/room1/config/desired
    topic read edu/fleet/config/desired   # the fleet's, the school's and the key set:
    topic read edu/fleet/school/school1/config/desired
    topic read edu/fleet/config/keys
    topic read edu/school1/room1/cmd/+
    topic readwrite edu/school1/room1/probe   # the self-test's broker round trip
    topic readwrite edu/lesson/music      # 'readwrite' for the main room, 'read' otherwise
    topic read edu/fleet/group/music/config/desired
    topic write homeassistant/sensor/school1_room1/+/config
    topic write homeassistant/binary_sensor/school1_room1/+/config

    # for every user, after the user blocks:
    pattern write edu/rtc/%u/+
    pattern read edu/rtc/+/%u

Why explicit ``user`` blocks rather than one ``pattern`` for the room's subtree: the
device's topics are ``edu/{site}/{room}/...`` (two levels) while its user name is the
single token ``{site}.{room}``, and Mosquitto substitutes ``%u`` as one unit, so
``pattern write edu/%u/#`` would mean ``edu/school1.room1/#``. Per-user blocks also let
us leave ``config/desired`` and ``cmd/{name}`` read-only for the device (only IT writes
them), which a ``#`` pattern could not. The signalling topics do fit a pattern:
``edu/rtc/{from}/{to}`` carries device ids, so a device may write only as ``from = itself``
and read only what is addressed to it. (Mosquitto refuses ``%u`` substitution for user
names containing ``+`` or ``#``; device ids are slugs joined by ``.``, so that never bites.)

Home Assistant discovery (`agent.health.discovery`, opt-in per device) lives outside the
prefix, under ``homeassistant/{component}/{node_id}/{object_id}/config``. A device may
write only its own node's configs (node id = device id with ``.`` as ``_``), and only
sensors and binary sensors: nothing with a ``command_topic`` that could make Home
Assistant publish on its behalf. Admins may read and write ``homeassistant/#`` (to
remove a retired room's entities), readers (Home Assistant itself) may read it. Two
devices whose node ids would collide (``a_b.c`` and ``a.b_c``) are refused.

Under MQTT 5 Mosquitto answers a denied QoS 1 publish with reason code 0x87 "Not
authorized" in the PUBACK (`agent.sync.PublishRejected`); a denied subscription is
granted but delivers nothing.

Password files use Mosquitto 2.0's ``$7$`` format (PBKDF2-HMAC-SHA512, 101 iterations,
12-byte salt), the same as ``mosquitto_passwd`` writes, so no extra binary is needed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping

from agent.config import IdentityConfig, LessonRole
from agent.contracts import FleetTopics, Topics
from agent.health import HA_COMPONENTS, HA_DISCOVERY_PREFIX, ha_node_id

_USER_RE = re.compile(r"^[^:\s#+/]+$")
PBKDF2_ITERATIONS = 101  # Mosquitto 2.0's default for $7$ hashes


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto ``$7$`` hash of ``password`` (as written by ``mosquitto_passwd``)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS, 64)
    return "$7${}${}${}".format(
        PBKDF2_ITERATIONS,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def _check_user(name: str) -> str:
    if not _USER_RE.match(name):
        raise ValueError(
            f"user name {name!r} is not usable in Mosquitto files (no ':', spaces, '#', '+' or '/')"
        )
    return name


def render_password_file(users: Mapping[str, str]) -> str:
    """Text of a Mosquitto password file for ``{user: clear-text password}``."""
    lines = [f"{_check_user(user)}:{hash_password(password)}" for user, password in users.items()]
    return "\n".join(lines) + "\n" if lines else ""


def device_acl_lines(
    identity: IdentityConfig,
    prefix: str = "edu",
    *,
    discovery_prefix: str | None = HA_DISCOVERY_PREFIX,
) -> list[str]:
    """The ``user`` block of one device (see the module docstring).

    ``discovery_prefix``: where Home Assistant discovery configs go; None leaves them out.
    """
    topics = Topics(prefix, identity.site, identity.room)
    lines = [
        f"user {_check_user(identity.device_id)}",
        f"topic write {topics.state}",
        f"topic write {topics.health}",
        f"topic write {topics.alert}",
        f"topic write {topics.sensing}",
        f"topic write {topics.config_reported}",
        f"topic write {topics.cmd_result_filter}",
        f"topic read {topics.config_desired}",
        # The profiles of every scope it belongs to (signed by IT; see agent.sync.envelope).
        f"topic read {topics.config_desired_for('fleet')}",
        f"topic read {topics.config_desired_for(f'school:{identity.site}')}",
        f"topic read {topics.config_keys}",
        f"topic read {topics.cmd_filter}",
        # The one topic a device both writes and reads: the self-test sends a message
        # there and waits for it to come back through the broker (agent.health.selftest).
        f"topic readwrite {topics.probe}",
    ]
    for membership in identity.groups:
        access = "readwrite" if membership.role is LessonRole.MAIN else "read"
        lines.append(f"topic {access} {topics.lesson(membership.group)}")
        lines.append(f"topic read {topics.config_desired_for(f'group:{membership.group}')}")
    if identity.groups:
        # Lesson peers watch each other's online state (a main room's Last Will ends
        # the rooms' attempts); state carries no media and no personal data.
        lines.append(f"topic read {topics.state_all}")
    if discovery_prefix is not None:
        node = ha_node_id(identity.device_id)
        for component in HA_COMPONENTS:
            lines.append(f"topic write {discovery_prefix}/{component}/{node}/+/config")
    return lines


def render_acl(
    devices: Iterable[IdentityConfig],
    *,
    prefix: str = "edu",
    admins: Iterable[str] = (),
    readers: Iterable[str] = (),
    anonymous: str | None = None,
    discovery_prefix: str | None = HA_DISCOVERY_PREFIX,
) -> str:
    """Text of a Mosquitto ACL file for a fleet.

    ``devices``: one ``user`` block each (user name = device id). ``admins``: users
    that may read and write everything under ``{prefix}/`` (IT, the config pusher).
    ``readers``: users that may read everything under ``{prefix}/`` (dashboards).
    ``anonymous``: ``None`` (default, anonymous clients get nothing), ``"read"`` or
    ``"readwrite"`` on every topic; only for the demo broker and tests.
    ``discovery_prefix``: Home Assistant's discovery prefix; admins read and write it,
    readers read it, each device writes its own node's configs (None: no such lines).
    """
    fleet = FleetTopics(prefix)
    lines = ["# Generated by agent.broker.acl: one block per device, least privilege."]
    if anonymous is not None:
        if anonymous not in ("read", "readwrite"):
            raise ValueError(f"anonymous must be None, 'read' or 'readwrite', got {anonymous!r}")
        # Lines before the first 'user' line apply to anonymous clients.
        lines += ["# anonymous clients (demo and tests only)", f"topic {anonymous} #"]
    nodes: dict[str, str] = {}
    for identity in devices:
        if discovery_prefix is not None:
            node = ha_node_id(identity.device_id)
            other = nodes.setdefault(node, identity.device_id)
            if other != identity.device_id:
                raise ValueError(
                    f"devices {other!r} and {identity.device_id!r} would share the Home "
                    f"Assistant node id {node!r}; rename one room"
                )
        lines += ["", *device_acl_lines(identity, prefix, discovery_prefix=discovery_prefix)]
    extra = [] if discovery_prefix is None else [f"{discovery_prefix}/#"]
    for admin in admins:
        lines += ["", f"user {_check_user(admin)}", f"topic readwrite {fleet.everything}"]
        lines += [f"topic readwrite {topic}" for topic in extra]
    for reader in readers:
        lines += ["", f"user {_check_user(reader)}", f"topic read {fleet.everything}"]
        lines += [f"topic read {topic}" for topic in extra]
    lines += [
        "",
        "# every client: WebRTC signalling only as itself, and only what is addressed to it",
        f"pattern write {fleet.rtc_out_pattern}",
        f"pattern read {fleet.rtc_in_pattern}",
    ]
    return "\n".join(lines) + "\n"

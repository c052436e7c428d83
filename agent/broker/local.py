"""The embedded broker, locked down like a school's: a password per client and the ACL.

A room with no ``broker.url`` and the demo both start Mosquitto on loopback. Left open,
any local process could speak as any room (a forged ``bye`` made a receiving room leave
its lesson). So the embedded broker gets the same ACL as the fleet (`render_acl`), no
anonymous access, and a generated password for each client: each room, and the
read-only observers (the demo's monitor, a maintenance dashboard). The passwords are
written once into a directory of the agent's (mode 0700, files 0600) as
``{user}.password``, the form ``broker.password_file`` reads, and reused on later starts.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.broker.acl import render_acl
from agent.broker.embedded import MosquittoBroker
from agent.config import AgentConfig, BrokerConfig, IdentityConfig

log = logging.getLogger(__name__)

PASSWORD_BYTES = 24
EMBEDDED_DIR = "embedded-broker"  # under supervisor.state_dir
LOCAL_DASHBOARD = "dashboard"  # a read-only user for a maintenance dashboard on the room PC


@dataclass(frozen=True)
class LocalCredentials:
    """The clients of one embedded broker and where each one's password is."""

    directory: Path
    passwords: dict[str, str]  # user -> clear-text password (hashed into the broker's file)

    def password_file(self, user: str) -> Path:
        if user not in self.passwords:
            raise KeyError(f"no embedded-broker credentials for {user!r}")
        return self.directory / f"{user}.password"

    def broker_config(self, user: str, url: str, *, topic_prefix: str) -> BrokerConfig:
        """A ``broker`` section for ``user`` on this broker (e.g. an observer's)."""
        return BrokerConfig(
            url=url,
            username=user,
            password_file=self.password_file(user),
            topic_prefix=topic_prefix,
        )


def local_credentials(directory: Path, users: Iterable[str]) -> LocalCredentials:
    """A password per user in ``directory`` (created 0700), kept from an earlier start."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    passwords: dict[str, str] = {}
    for user in dict.fromkeys(users):
        path = directory / f"{user}.password"
        existing = path.read_text(encoding="utf-8").strip() if path.exists() else ""
        if not existing:
            existing = secrets.token_urlsafe(PASSWORD_BYTES)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(existing + "\n")
        path.chmod(0o600)
        passwords[user] = existing
    return LocalCredentials(directory, passwords)


def locked_broker(
    devices: Sequence[IdentityConfig],
    directory: Path,
    *,
    prefix: str,
    readers: Sequence[str] = (),
    admins: Sequence[str] = (),
) -> tuple[MosquittoBroker, LocalCredentials]:
    """An embedded Mosquitto that only ``devices`` (as themselves), ``readers`` (read
    only) and ``admins`` (IT: commands, profiles) may use, with the fleet's ACL; their
    passwords are in ``directory``."""
    credentials = local_credentials(
        directory, [*(device.device_id for device in devices), *readers, *admins]
    )
    acl = render_acl(devices, prefix=prefix, readers=readers, admins=admins)
    broker = MosquittoBroker(users=credentials.passwords, acl=acl, allow_anonymous=False)
    return broker, credentials


def embedded_password_file(config: AgentConfig) -> Path:
    """The room's own password on its embedded broker (what its link presents)."""
    return config.supervisor.state_dir / EMBEDDED_DIR / f"{config.identity.device_id}.password"


class RoomBroker:
    """The embedded broker of a room with no ``broker.url``, following its config.

    `url_for` says, without starting anything, which URL a config would use: None for a
    configured broker, the running embedded one's when it fits the config (same device,
    prefix and directory), else `PENDING`. `start_for` starts one that fits (the one
    running stays up until `keep_only` says which is in use: a reload that fails keeps
    its link on the old one).
    """

    PENDING = "embedded"

    def __init__(self) -> None:
        self._running: dict[str, tuple[tuple[str, str, Path], MosquittoBroker]] = {}

    @staticmethod
    def _key(config: AgentConfig) -> tuple[str, str, Path]:
        directory = config.supervisor.state_dir / EMBEDDED_DIR
        return (config.identity.device_id, config.broker.topic_prefix, directory)

    def url_for(self, config: AgentConfig) -> str | None:
        if config.broker.url is not None:
            return None
        key = self._key(config)
        for url, (running_key, _) in self._running.items():
            if running_key == key:
                return url
        return self.PENDING

    async def start_for(self, config: AgentConfig) -> str | None:
        url = self.url_for(config)
        if url != self.PENDING:
            return url
        _, prefix, directory = self._key(config)
        broker, _ = locked_broker(
            [config.identity], directory, prefix=prefix, readers=[LOCAL_DASHBOARD]
        )
        await broker.start()
        self._running[broker.url] = (self._key(config), broker)
        log.info(
            "no broker configured: started the embedded Mosquitto at %s (password and ACL "
            "as in a school; a dashboard on this PC can read as %r with %s)",
            broker.url,
            LOCAL_DASHBOARD,
            directory / f"{LOCAL_DASHBOARD}.password",
        )
        return broker.url

    async def keep_only(self, url: str | None) -> None:
        """Stop every embedded broker but the one at ``url`` (the link's)."""
        for running_url in [u for u in self._running if u != url]:
            _, broker = self._running.pop(running_url)
            await broker.stop()
            if url is None:
                log.info("stopped the embedded Mosquitto: broker.url is configured now")
            else:
                log.info(
                    "stopped the embedded Mosquitto at %s: the link moved to %s", running_url, url
                )

"""The link's credentials: password file and TLS context, re-read before each attempt.

Blocking (file reads, certificate parsing): the link calls these on a worker thread.
A file that cannot be used is a `LinkConfigError` naming the field and the fix.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.config import BrokerConfig, IdentityConfig
from agent.sync.messages import (
    LinkConfigError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None
    ssl_context: ssl.SSLContext | None


def read_password_file(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LinkConfigError(
            f"broker.password_file: cannot read {path}: {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise LinkConfigError(f"broker.password_file: {path} is not UTF-8 text") from exc
    password = text.rstrip("\r\n")
    if not password:
        raise LinkConfigError(f"broker.password_file: {path} is empty")
    return password


def load_credentials(
    broker: BrokerConfig,
    identity: IdentityConfig,
    url: str,
    *,
    tls: bool,
    previous: Credentials | None,
) -> Credentials:
    """The user name, password and TLS context for the next connection attempt."""
    password: str | None = None
    if broker.password is not None:
        password = broker.password.get_secret_value()
    elif broker.password_file is not None:
        password = read_password_file(broker.password_file)
    username = broker.username
    if username is None and password is not None:
        username = identity.device_id
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl_context(broker)
    elif broker.tls is not None and previous is None:
        logger.warning("broker.tls is ignored: %s is not an mqtts:// URL", url)
    return Credentials(username, password, context)


def ssl_context(broker: BrokerConfig) -> ssl.SSLContext:
    """A client context that verifies the broker and presents the device certificate."""
    tls = broker.tls
    assert tls is not None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise LinkConfigError(
            f"broker.tls.ca_file: {tls.ca_file} is not a PEM CA certificate ({exc.reason})"
        ) from exc
    except OSError as exc:
        raise LinkConfigError(
            f"broker.tls.ca_file: cannot read {tls.ca_file}: {exc.strerror}"
        ) from exc
    if tls.cert_file is not None and tls.key_file is not None:
        for field, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
            if not Path(path).is_file():
                raise LinkConfigError(f"broker.tls.{field}: {path} does not exist")
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except ssl.SSLError as exc:
            raise LinkConfigError(
                f"broker.tls.cert_file/key_file: {tls.cert_file} and {tls.key_file} are not "
                f"a PEM certificate and its private key ({exc.reason})"
            ) from exc
        except OSError as exc:
            raise LinkConfigError(
                f"broker.tls.cert_file/key_file: cannot read {tls.cert_file} or "
                f"{tls.key_file}: {exc.strerror or exc}"
            ) from exc
    context.check_hostname = tls.check_hostname
    return context

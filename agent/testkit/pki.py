"""Throw-away TLS material for tests, demos and local trials of mutual TLS.

``make_test_pki(directory)`` writes a small certificate authority and everything the
broker and link tests need, including the material for negative tests:

=====================  ===============================================================
file                   what it is
=====================  ===============================================================
``ca.pem``             the test CA (trusted by the broker for client certificates and
                       by the agent for the broker's certificate)
``ca.key``             its private key (kept so a script can issue more certificates)
``server.pem/.key``    the broker's certificate for ``localhost`` and ``127.0.0.1``
``{device}.pem/.key``  one client certificate per device id, CN = the device id
``expired.pem/.key``   a client certificate of the test CA whose validity has ended
``rogue-ca.pem``       a different CA, unknown to the broker
``rogue.pem/.key``     a client certificate issued by the rogue CA
=====================  ===============================================================

Keys are ECDSA P-256 (fast to generate; Mosquitto and Python's ``ssl`` accept them).
Private keys are written with mode 0600. This is test material: the keys are not
protected by a passphrase and the CA is not meant for production use.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.broker import CertPair, make_ca, save_pair, sign_certificate, write_cert, write_key

DEFAULT_DEVICE_IDS = ("school1.room1", "school1.room2")
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")  # the test broker listens on loopback


@dataclass(frozen=True)
class PkiMaterial:
    """Paths of the files written by `make_test_pki`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server: CertPair
    clients: dict[str, CertPair] = field(default_factory=dict)
    expired_client: CertPair | None = None
    rogue_ca_cert: Path | None = None
    rogue_client: CertPair | None = None

    def client(self, device_id: str) -> CertPair:
        """The client certificate of ``device_id`` (KeyError names the known ids)."""
        try:
            return self.clients[device_id]
        except KeyError:
            known = ", ".join(sorted(self.clients))
            raise KeyError(f"no client certificate for {device_id!r}; have: {known}") from None


def make_test_pki(
    directory: Path | str, device_ids: Sequence[str] = DEFAULT_DEVICE_IDS
) -> PkiMaterial:
    """Create a test CA, a broker certificate and client certificates in ``directory``.

    ``device_ids`` become the client certificates' common names (one certificate each).
    Returns the paths; see the module docstring for the file list. Blocking (key
    generation and file writes, a few milliseconds per certificate): call it from
    ``asyncio.to_thread`` on a busy event loop.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    valid_from = now - dt.timedelta(hours=1)
    valid_to = now + dt.timedelta(days=825)

    ca_cert, ca_key = make_ca("Classroom Edge Agent test CA", now)
    write_cert(out / "ca.pem", ca_cert)
    write_key(out / "ca.key", ca_key)

    server_cert, server_key = sign_certificate(
        ca_cert,
        ca_key,
        "localhost",
        server_names=SERVER_NAMES,
        not_before=valid_from,
        not_after=valid_to,
    )
    server = save_pair(out, "server", server_cert, server_key)

    clients: dict[str, CertPair] = {}
    for device_id in device_ids:
        if not device_id or "/" in device_id or device_id.startswith("."):
            raise ValueError(f"device id {device_id!r} cannot be used as a file name")
        cert, key = sign_certificate(
            ca_cert, ca_key, device_id, not_before=valid_from, not_after=valid_to
        )
        clients[device_id] = save_pair(out, device_id, cert, key)

    expired_cert, expired_key = sign_certificate(
        ca_cert,
        ca_key,
        "expired.device",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    expired = save_pair(out, "expired", expired_cert, expired_key)

    rogue_ca_cert, rogue_ca_key = make_ca("Rogue test CA", now)
    write_cert(out / "rogue-ca.pem", rogue_ca_cert)
    first_device = device_ids[0] if device_ids else "rogue.device"
    rogue_cert, rogue_key = sign_certificate(
        rogue_ca_cert,
        rogue_ca_key,
        first_device,  # same CN as a real device: only the issuer gives it away
        not_before=valid_from,
        not_after=valid_to,
    )
    rogue = save_pair(out, "rogue", rogue_cert, rogue_key)

    return PkiMaterial(
        directory=out,
        ca_cert=out / "ca.pem",
        ca_key=out / "ca.key",
        server=server,
        clients=clients,
        expired_client=expired,
        rogue_ca_cert=out / "rogue-ca.pem",
        rogue_client=rogue,
    )

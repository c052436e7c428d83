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
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DEVICE_IDS = ("school1.room1", "school1.room2")


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key."""

    cert: Path
    key: Path


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


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Classroom Edge Agent (test)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start so the key is never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(
    common_name: str,
    now: dt.datetime,
    *,
    name: x509.Name | None = None,
    backdate: dt.timedelta = dt.timedelta(days=1),
    valid_for: dt.timedelta = dt.timedelta(days=3650),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA (the test PKI's, and the fleet CA of `agent.sync.credentials`)."""
    key = _new_key()
    name = name or _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def _save_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertPair:
    pair = CertPair(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
    _write_cert(pair.cert, cert)
    _write_key(pair.key, key)
    return pair


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

    ca_cert, ca_key = _make_ca("Classroom Edge Agent test CA", now)
    _write_cert(out / "ca.pem", ca_cert)
    _write_key(out / "ca.key", ca_key)

    server_cert, server_key = _issue(
        ca_cert, ca_key, "localhost", server=True, not_before=valid_from, not_after=valid_to
    )
    server = _save_pair(out, "server", server_cert, server_key)

    clients: dict[str, CertPair] = {}
    for device_id in device_ids:
        if not device_id or "/" in device_id or device_id.startswith("."):
            raise ValueError(f"device id {device_id!r} cannot be used as a file name")
        cert, key = _issue(
            ca_cert, ca_key, device_id, server=False, not_before=valid_from, not_after=valid_to
        )
        clients[device_id] = _save_pair(out, device_id, cert, key)

    expired_cert, expired_key = _issue(
        ca_cert,
        ca_key,
        "expired.device",
        server=False,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    expired = _save_pair(out, "expired", expired_cert, expired_key)

    rogue_ca_cert, rogue_ca_key = _make_ca("Rogue test CA", now)
    _write_cert(out / "rogue-ca.pem", rogue_ca_cert)
    first_device = device_ids[0] if device_ids else "rogue.device"
    rogue_cert, rogue_key = _issue(
        rogue_ca_cert,
        rogue_ca_key,
        first_device,  # same CN as a real device: only the issuer gives it away
        server=False,
        not_before=valid_from,
        not_after=valid_to,
    )
    rogue = _save_pair(out, "rogue", rogue_cert, rogue_key)

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

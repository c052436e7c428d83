"""Signed documents from IT: the envelope, its scope, the pinned keys and their rotation.

One envelope format carries every document IT signs (``config`` profiles now, ``keys``
documents that rotate the pinned keys, ``roster`` documents for sensing). What is signed
is an unambiguous encoding of every field (`Envelope.signed`, modelled on DSSE's
pre-authentication encoding: each field length-prefixed, the payload's exact bytes),
never re-serialised JSON, so two parsers can never disagree about what was signed.

The threat model is in ``docs/profiles.md``; in short: an attacker who can publish on
the broker cannot make a device apply a document IT did not sign, an older one again, one
signed for another room or school, one past its expiry, or one signed with a key IT has
retired; one stolen key can sign profiles but cannot change the key set (that takes
``threshold`` distinct pinned keys).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.contracts import DEVICE_ID_PATTERN, is_device_id, is_slug

ENVELOPE_FORMAT = "classroom-agent/signed/v1"
PAE_PREFIX = b"CLASSROOM-AGENT-SIGNED-V1"
# The broker's packet limit is 256 KiB: anything larger is refused before it is parsed.
MAX_ENVELOPE_BYTES = 256 * 1024
MAX_PAYLOAD_BYTES = 160 * 1024  # base64 of this plus the header fits the envelope limit
MAX_SIGNATURES = 16
DEFAULT_CHECK_S = 30
PayloadType = Literal["config", "keys", "roster"]
PAYLOAD_TYPES: tuple[str, ...] = ("config", "keys", "roster")


class Reason(StrEnum):
    """Why a document was refused: a stable code for dashboards, then a sentence."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    WRONG_TYPE = "wrong-type"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_KEY = "unknown-key"
    RETIRED_KEY = "retired-key"
    THRESHOLD = "threshold"
    EXPIRED = "expired"
    FUTURE = "issued-in-future"
    REPLAYED = "replayed"
    WRONG_SCOPE = "wrong-scope"
    WRONG_TOPIC = "wrong-topic"
    INVALID = "schema-invalid"
    FORBIDDEN_KEY = "forbidden-key"


class Rejected(Exception):
    """A document refused with a reason code and a sentence naming the fix."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


# -- keys -----------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    """16 hex digits of the SHA-256 of the raw public key: short, stable, unforgeable."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public: Ed25519PublicKey) -> str:
    """The pinned form of a public key: ``ed25519:BASE64`` (what site files list)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """``ed25519:BASE64`` (or bare base64 of the 32 raw bytes) -> the key; ValueError else."""
    body = text.strip()
    if body.startswith("ed25519:"):
        body = body[len("ed25519:") :]
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64; expected 'ed25519:' and the key from a .pub file") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()


def generate_key(directory: Path) -> KeyPair:
    """Write ``<keyid>.key`` (PEM PKCS#8, 0600) and ``<keyid>.pub`` into ``directory``."""
    private = Ed25519PrivateKey.generate()
    pair = KeyPair(key_id(private.public_key()), private)
    directory.mkdir(parents=True, exist_ok=True)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = directory / f"{pair.key_id}.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    (directory / f"{pair.key_id}.pub").write_text(public_key_text(pair.public) + "\n")
    return pair


def load_private_key(path: Path) -> KeyPair:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the key: {exc.strerror or exc}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return KeyPair(key_id(private.public_key()), private)


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Public keys from ``.pub`` files and directories of them, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        for file in files:
            try:
                public = parse_public_key(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"{file}: not a public key: {exc}") from None
            keys[key_id(public)] = public
    return keys


# -- scopes ---------------------------------------------------------------------------------

ScopeKind = Literal["fleet", "school", "group", "room"]


@dataclass(frozen=True)
class Scope:
    """Who a document is for: ``fleet``, ``school:SITE``, ``group:GROUP``, ``room:SITE.ROOM``
    or ``room:SITE.ROOM,SITE.ROOM,...`` (a list of rooms). Signed, so never widened."""

    kind: ScopeKind
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Scope:
        text = text.strip()
        if text == "fleet":
            return cls("fleet")
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(
                f"scope {text!r}: use fleet, school:SITE, group:GROUP or room:SITE.ROOM[,...]"
            )
        if kind in ("school", "group"):
            if not is_slug(rest):
                raise ValueError(f"scope {text!r}: {rest!r} is not a {kind} id (a-z, 0-9, -, _)")
            return cls(kind, (rest,))  # type: ignore[arg-type]
        if kind == "room":
            rooms = tuple(sorted({name.strip() for name in rest.split(",")}))
            for room in rooms:
                if not is_device_id(room):
                    raise ValueError(
                        f"scope {text!r}: {room!r} is not a device id SITE.ROOM "
                        f"({DEVICE_ID_PATTERN})"
                    )
            return cls("room", rooms)
        raise ValueError(f"scope {text!r}: the kind must be fleet, school, group or room")

    def __str__(self) -> str:
        if self.kind == "fleet":
            return "fleet"
        return f"{self.kind}:{','.join(self.names)}"

    def includes(self, device_id: str, groups: Iterable[str]) -> bool:
        if self.kind == "fleet":
            return True
        if self.kind == "school":
            return device_id.partition(".")[0] == self.names[0]
        if self.kind == "group":
            return self.names[0] in set(groups)
        return device_id in self.names

    def layers(self) -> list[str]:
        """The layer keys it lands in (one per listed room for a room list)."""
        if self.kind == "fleet":
            return ["fleet"]
        if self.kind == "room":
            return [f"room:{name}" for name in self.names]
        return [f"{self.kind}:{self.names[0]}"]


LAYER_ORDER: dict[str, int] = {"fleet": 0, "school": 1, "group": 2, "room": 3}


def layer_sort_key(layer: str) -> tuple[int, str]:
    """Later wins: fleet < school < group (by name) < room."""
    kind, _, name = layer.partition(":")
    return LAYER_ORDER.get(kind, 9), name


def device_layers(device_id: str, groups: Iterable[str]) -> list[str]:
    """Every layer a device takes documents from, in the order they apply."""
    site = device_id.partition(".")[0]
    layers = ["fleet", f"school:{site}", *(f"group:{g}" for g in sorted(set(groups)))]
    return [*layers, f"room:{device_id}"]


# -- the envelope ------------------------------------------------------------------------------


def _field(value: bytes) -> bytes:
    return b"%d " % len(value) + value


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet verified) signed document."""

    payload_type: str
    scope: Scope
    version: int
    issued_at: int
    expires_at: int
    payload: bytes
    signatures: tuple[Signature, ...]
    wave: int | None = None  # percent of the scope's devices that apply it; None: all
    check_s: int = DEFAULT_CHECK_S  # how long the device checks what the change touched
    raw: bytes = b""  # the envelope exactly as received (persisted as such)

    def signed(self) -> bytes:
        """What a signature covers: every field, length-prefixed, in a fixed order."""
        fields = [
            self.payload_type.encode("utf-8"),
            str(self.scope).encode("utf-8"),
            str(self.version).encode("ascii"),
            str(self.issued_at).encode("ascii"),
            str(self.expires_at).encode("ascii"),
            b"" if self.wave is None else str(self.wave).encode("ascii"),
            str(self.check_s).encode("ascii"),
            self.payload,
        ]
        return PAE_PREFIX + b"".join(b" " + _field(value) for value in fields)

    @property
    def key_ids(self) -> list[str]:
        return [s.key_id for s in self.signatures]

    def describe(self) -> str:
        return f"{self.payload_type} {self.scope} v{self.version}"

    def to_json(self) -> bytes:
        document: dict[str, Any] = {
            "envelope": ENVELOPE_FORMAT,
            "type": self.payload_type,
            "scope": str(self.scope),
            "version": self.version,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "wave": self.wave,
            "check_s": self.check_s,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [
                {"keyid": s.key_id, "sig": base64.b64encode(s.signature).decode("ascii")}
                for s in self.signatures
            ],
        }
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"


def _int(document: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Rejected(Reason.MALFORMED, f"{name!r} must be an integer from {low} to {high}")
    return value


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise Rejected(Reason.MALFORMED, f"{name!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(Reason.MALFORMED, f"{name!r} is not valid base64") from None


def parse_envelope(data: bytes) -> Envelope:
    """Parse an envelope; `Rejected` (oversized, malformed) for anything else."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise Rejected(
            Reason.OVERSIZED, f"{len(data)} bytes; the limit is {MAX_ENVELOPE_BYTES} bytes"
        )
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Rejected(
            Reason.MALFORMED, "not UTF-8 text; expected a signed JSON envelope"
        ) from None
    except json.JSONDecodeError as exc:
        raise Rejected(Reason.MALFORMED, f"not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(document, dict):
        raise Rejected(Reason.MALFORMED, "expected a JSON object (a signed envelope)")
    if document.get("envelope") != ENVELOPE_FORMAT:
        raise Rejected(Reason.MALFORMED, f"'envelope' must be {ENVELOPE_FORMAT!r}")
    known = {"envelope", "type", "scope", "version", "issued_at", "expires_at", "wave"}
    known |= {"check_s", "payload", "signatures"}
    extra = sorted(set(document) - known)
    if extra:
        raise Rejected(Reason.MALFORMED, f"unknown fields {', '.join(extra)}")
    payload_type = document.get("type")
    if payload_type not in PAYLOAD_TYPES:
        raise Rejected(Reason.MALFORMED, f"'type' must be one of {', '.join(PAYLOAD_TYPES)}")
    scope_text = document.get("scope")
    if not isinstance(scope_text, str):
        raise Rejected(Reason.MALFORMED, "'scope' must be a string")
    try:
        scope = Scope.parse(scope_text)
    except ValueError as exc:
        raise Rejected(Reason.MALFORMED, str(exc)) from None
    if str(scope) != scope_text:
        raise Rejected(Reason.MALFORMED, f"'scope' must be written {str(scope)!r}")
    version = _int(document, "version", 1, 2**53)
    issued_at = _int(document, "issued_at", 0, 2**40)
    expires_at = _int(document, "expires_at", 0, 2**40)
    wave_value = document.get("wave")
    wave = None if wave_value is None else _int(document, "wave", 1, 100)
    check_s = _int(document, "check_s", 1, 600) if "check_s" in document else DEFAULT_CHECK_S
    payload = _b64(document.get("payload"), "payload")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Rejected(
            Reason.OVERSIZED, f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    raw_signatures = document.get("signatures")
    if not isinstance(raw_signatures, list) or not 1 <= len(raw_signatures) <= MAX_SIGNATURES:
        raise Rejected(Reason.MALFORMED, f"'signatures' must list 1 to {MAX_SIGNATURES} signatures")
    signatures = []
    for index, entry in enumerate(raw_signatures):
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
            raise Rejected(Reason.MALFORMED, f"signatures[{index}] must be {{keyid, sig}}")
        if not isinstance(entry["keyid"], str) or len(entry["keyid"]) > 64:
            raise Rejected(Reason.MALFORMED, f"signatures[{index}].keyid must be a key id")
        signatures.append(Signature(entry["keyid"], _b64(entry["sig"], f"signatures[{index}].sig")))
    return Envelope(
        payload_type,
        scope,
        version,
        issued_at,
        expires_at,
        payload,
        tuple(signatures),
        wave=wave,
        check_s=check_s,
        raw=data,
    )


def sign(
    payload: bytes,
    *,
    payload_type: str,
    scope: Scope,
    version: int,
    keys: Sequence[KeyPair],
    expires_in: dt.timedelta = dt.timedelta(days=30),
    wave: int | None = None,
    check_s: int = DEFAULT_CHECK_S,
    now: float | None = None,
) -> Envelope:
    """Sign ``payload`` with every key in ``keys`` (one for a profile, a threshold for keys)."""
    if payload_type not in PAYLOAD_TYPES:
        raise ValueError(f"payload type must be one of {', '.join(PAYLOAD_TYPES)}")
    if not 1 <= version <= 2**53:
        raise ValueError("version must be a positive integer")
    if wave is not None and not 1 <= wave <= 100:
        raise ValueError("wave must be a percentage from 1 to 100")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    issued = int(now if now is not None else dt.datetime.now(dt.UTC).timestamp())
    expires = issued + int(expires_in.total_seconds())
    unsigned = Envelope(
        payload_type, scope, version, issued, expires, payload, (), wave=wave, check_s=check_s
    )
    message = unsigned.signed()
    signatures = tuple(Signature(pair.key_id, pair.private.sign(message)) for pair in keys)
    envelope = Envelope(
        payload_type,
        scope,
        version,
        issued,
        expires,
        payload,
        signatures,
        wave=wave,
        check_s=check_s,
    )
    return parse_envelope(envelope.to_json())  # what devices will parse, raw included


# -- the pinned key set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Keyring:
    """The IT public keys a device trusts, the threshold that may replace them, and the
    keys it has retired (so a refusal can say 'retired', not just 'unknown')."""

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int = 2
    version: int = 0  # of the keys document that set it; 0: the site file's keys
    retired: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_texts(cls, texts: Iterable[str], threshold: int = 2) -> Keyring:
        keys = {}
        for text in texts:
            public = parse_public_key(text)
            keys[key_id(public)] = public
        return cls(keys, threshold)

    def fingerprint(self) -> str:
        return ",".join(sorted(self.keys))

    def _check_one(self, envelope: Envelope, signature: Signature, message: bytes) -> None:
        public = self.keys.get(signature.key_id)
        if public is None:
            if signature.key_id in self.retired:
                raise Rejected(
                    Reason.RETIRED_KEY,
                    f"signed by key {signature.key_id}, which IT has retired; re-sign with a "
                    "pinned key",
                )
            raise Rejected(
                Reason.UNKNOWN_KEY,
                f"signed by key {signature.key_id}, which this device does not pin; pinned: "
                f"{', '.join(sorted(self.keys)) or 'none'}",
            )
        try:
            public.verify(signature.signature, message)
        except InvalidSignature:
            raise Rejected(
                Reason.BAD_SIGNATURE,
                f"the signature by key {signature.key_id} does not match {envelope.describe()} "
                "(altered in transit, or forged)",
            ) from None

    def verify_single(self, envelope: Envelope) -> str:
        """A profile or roster: one valid signature by a pinned key; returns its key id."""
        message = envelope.signed()
        failure: Rejected | None = None
        for signature in envelope.signatures:
            try:
                self._check_one(envelope, signature, message)
            except Rejected as exc:
                failure = failure or exc
                continue
            return signature.key_id
        assert failure is not None  # parse_envelope guarantees one signature at least
        raise failure

    def verify_threshold(self, envelope: Envelope) -> list[str]:
        """A keys document: ``threshold`` distinct pinned keys, every signature valid."""
        message = envelope.signed()
        good: set[str] = set()
        for signature in envelope.signatures:
            try:
                self._check_one(envelope, signature, message)
            except Rejected as exc:
                if exc.reason is Reason.BAD_SIGNATURE:
                    raise
                continue  # a signature by a key we do not pin adds nothing
            good.add(signature.key_id)
        if len(good) < self.threshold:
            raise Rejected(
                Reason.THRESHOLD,
                f"a keys document needs signatures by {self.threshold} pinned keys; it has "
                f"{len(good)} ({', '.join(sorted(good)) or 'none'})",
            )
        return sorted(good)

    def rotated(self, envelope: Envelope) -> Keyring:
        """The key set a verified keys document installs (`Rejected` if it is unusable)."""
        try:
            document = json.loads(envelope.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Rejected(Reason.MALFORMED, "a keys document's payload must be JSON") from None
        if not isinstance(document, dict) or set(document) - {"keys", "threshold"}:
            raise Rejected(Reason.MALFORMED, "a keys document is {keys: [...], threshold: N}")
        texts = document.get("keys")
        threshold = document.get("threshold", 2)
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise Rejected(Reason.MALFORMED, "'keys' must list 'ed25519:...' public keys")
        try:
            new = Keyring.from_texts(texts)
        except ValueError as exc:
            raise Rejected(Reason.MALFORMED, f"keys: {exc}") from None
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise Rejected(Reason.MALFORMED, "'threshold' must be an integer")
        if len(new.keys) < 2 or not 2 <= threshold <= len(new.keys):
            raise Rejected(
                Reason.MALFORMED,
                "a key set needs at least 2 keys and a threshold from 2 to the number of keys "
                "(so one stolen key can never replace them)",
            )
        retired = (self.retired | set(self.keys)) - set(new.keys)
        return Keyring(new.keys, threshold, envelope.version, frozenset(retired))

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": [public_key_text(k) for _, k in sorted(self.keys.items())],
            "threshold": self.threshold,
            "version": self.version,
            "retired": sorted(self.retired),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Keyring:
        ring = cls.from_texts(data["keys"], int(data["threshold"]))
        return Keyring(ring.keys, ring.threshold, int(data["version"]), frozenset(data["retired"]))


# -- checks of time and scope --------------------------------------------------------------------


def check_time(envelope: Envelope, now: float, max_skew_s: float, clock: str) -> None:
    """Not expired, not issued in the future beyond ``max_skew_s``; ``clock`` says whether
    this device's clock is synchronised (part of the reason, for the technician)."""
    if now >= envelope.expires_at:
        expired = dt.datetime.fromtimestamp(envelope.expires_at, dt.UTC).isoformat()
        raise Rejected(
            Reason.EXPIRED,
            f"{envelope.describe()} expired at {expired}; re-sign it with a later --expires "
            f"(device clock: {clock})",
        )
    if envelope.issued_at > now + max_skew_s:
        ahead = envelope.issued_at - now
        raise Rejected(
            Reason.FUTURE,
            f"{envelope.describe()} was issued {math.ceil(ahead)} s in this device's future "
            f"(more than the {max_skew_s:.0f} s allowed); check the clocks (device clock: "
            f"{clock})",
        )


def check_scope(envelope: Envelope, layer: str, device_id: str, groups: Iterable[str]) -> None:
    """The signed scope includes this device and was published on its own layer's topic
    (a room profile re-published on a school topic is refused)."""
    if not envelope.scope.includes(device_id, groups):
        raise Rejected(
            Reason.WRONG_SCOPE,
            f"{envelope.describe()} is for {envelope.scope}, which does not include {device_id}",
        )
    if layer not in envelope.scope.layers():
        raise Rejected(
            Reason.WRONG_TOPIC,
            f"{envelope.describe()} arrived on the {layer} topic; a {envelope.scope} document "
            "belongs on its own scope's topic",
        )


def wave_bucket(device_id: str, scope: Scope) -> float:
    """Where a device sits in a scope's rollout, 0 <= b < 100: from the device id and the
    scope only, so widening a wave keeps every device that was already in it."""
    digest = hashlib.sha256(f"{scope}|{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def in_wave(envelope: Envelope, device_id: str) -> bool:
    return envelope.wave is None or wave_bucket(device_id, envelope.scope) < envelope.wave

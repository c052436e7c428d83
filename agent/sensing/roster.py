"""Class rosters and the encrypted store of enrolled students' face embeddings.

A roster file (YAML) lists pseudonymous student ids, display names, the consent flag and
the class. Enrolment turns each consenting student's photos into embeddings; the store
keeps them, with the roster entries, in one AES-GCM encrypted file (``roster.enc``) so a
store copied off the device without its key is unreadable. Attendance records use the
same key (``seal``/``unseal``).

The key (32 bytes, raw or 64 hex digits) comes from, in order: ``sensing.key_file`` or
``--key-file`` (must be 0600 or stricter), the systemd credential ``sensing-key`` in
``$CREDENTIALS_DIRECTORY`` (the package's unit decrypts it there with
``LoadCredentialEncrypted=``; ``classroom-agent-admin`` does the same for the CLI), or
``{store}/store.key``, created 0600 on first enrolment (a checkout, the demo). It is
never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.config import SLUG_PATTERN, AgentConfig
from agent.sensing.faces import Embedding
from agent.sensing.pipeline import Gallery
from agent.sync import (
    PROFILES_DIR,
    Keyring,
    Rejected,
    check_time,
    load_keyring,
    parse_envelope,
)

STORE_FILE = "roster.enc"
KEY_FILE = "store.key"
CREDENTIAL = "sensing-key"
_MAGIC = b"CEAS1"  # classroom edge agent sealed, version 1
_NONCE = 12
RECORD_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}")
RecordKind = Literal["attendance", "report"]
RECORD_KINDS: tuple[RecordKind, ...] = ("attendance", "report")  # a folder and a purpose each


class RosterError(Exception):
    """A roster file, store or key that cannot be used; the message names it and the fix."""


# -- the roster file ------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Student(_Strict):
    id: str = Field(pattern=SLUG_PATTERN, max_length=64, description="Pseudonymous student id")
    name: str = Field(min_length=1, max_length=100, description="Display name (stays on device)")
    consent: bool = Field(description="A guardian's consent to face recognition is on record")
    class_name: str | None = Field(
        default=None, alias="class", description="Class, when it differs from the roster's"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RosterFile(_Strict):
    class_name: str = Field(alias="class", min_length=1, max_length=100, description="Class")
    students: list[Student] = Field(min_length=1, description="The class's students")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("students")
    @classmethod
    def _unique(cls, students: list[Student]) -> list[Student]:
        seen: set[str] = set()
        dupes = sorted({s.id for s in students if s.id in seen or seen.add(s.id)})  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"duplicate student ids: {', '.join(dupes)} (each id once)")
        return students


def read_roster(path: Path) -> RosterFile:
    """Parse and check a roster file; RosterError names the file, the field and the fix."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RosterError(f"{path}: cannot read ({exc.strerror})") from None
    return _parse_roster(raw, str(path))


def is_signed(path: Path) -> bool:
    """Whether the file is a signed envelope (``profile sign --type roster``), by its head."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"envelope"' in head


def read_signed_roster(path: Path, config: AgentConfig, now: float | None = None) -> RosterFile:
    """A roster IT signed (``classroom-agent profile sign --type roster``): one valid
    signature by a key this device pins (``profiles.trusted_keys``), in date, for a scope
    that includes this room; then checked like a roster file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RosterError(f"{path}: cannot read ({exc.strerror})") from None
    identity = config.identity
    try:
        envelope = parse_envelope(raw)
        if envelope.payload_type != "roster":
            raise RosterError(
                f"{path}: a signed {envelope.payload_type} document, not a roster "
                "(sign it with --type roster)"
            )
        texts = config.profiles.trusted_keys
        if not texts:
            raise RosterError(
                f"{path}: signed, but this device pins no IT keys (profiles.trusted_keys)"
            )
        # The keys the device trusts now: the site file's, or a set IT has rotated to.
        site_keys = Keyring.from_texts(texts, config.profiles.keys_threshold)
        directory = config.supervisor.state_dir / PROFILES_DIR
        load_keyring(directory, site_keys).verify_single(envelope)
        check_time(
            envelope,
            time.time() if now is None else now,
            config.profiles.max_clock_skew_s,
            "see timedatectl",
        )
        groups = [g.group for g in identity.groups]
        if not envelope.scope.includes(identity.device_id, groups):
            raise RosterError(
                f"{path}: signed for {envelope.scope}, which does not include {identity.device_id}"
            )
    except Rejected as exc:
        raise RosterError(f"{path}: refused: {exc}") from None
    return _parse_roster(envelope.payload, f"{path} ({envelope.describe()})")


def _parse_roster(raw: bytes, where: str) -> RosterFile:
    path = where
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RosterError(
            f"{path}: line {line}: not UTF-8 (byte {exc.start}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RosterError(f"{path}: not YAML: {exc}") from None
    try:
        return RosterFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'roster'}: {e['msg']}" for e in exc.errors()
        )
        raise RosterError(f"{path}: {problems}") from None


# -- the key and sealing ----------------------------------------------------------------------


def _parse_key(data: bytes, where: str) -> bytes:
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == 32:
        return data
    raise RosterError(f"{where}: a key is 32 bytes or 64 hex digits (got {len(data)} bytes)")


def load_key(store_dir: Path, key_file: Path | None = None, *, create: bool = False) -> bytes:
    """The store's key: the named file, the systemd credential, or the store's own key file."""
    if key_file is None:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials and (Path(credentials) / CREDENTIAL).exists():
            # systemd made it readable only by this service; no mode check needed.
            return _parse_key((Path(credentials) / CREDENTIAL).read_bytes(), "credential")
        key_file = store_dir / KEY_FILE
        if not key_file.exists() and create:
            store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
    try:
        mode = key_file.stat().st_mode
    except FileNotFoundError:
        raise RosterError(
            f"{key_file}: key missing (set sensing.key_file, the systemd credential "
            f"{CREDENTIAL!r}, or enrol a roster to create one)"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RosterError(f"{key_file}: key readable by others (mode {mode & 0o777:o}); chmod 600")
    return _parse_key(key_file.read_bytes(), str(key_file))


def seal(key: bytes, payload: dict[str, Any], purpose: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _MAGIC + nonce + AESGCM(key).encrypt(nonce, body, _MAGIC + purpose)


def unseal(key: bytes, blob: bytes, purpose: bytes, where: str) -> dict[str, Any]:
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + 16:
        raise RosterError(f"{where}: not a sealed store file")
    nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
    try:
        body = AESGCM(key).decrypt(nonce, blob[len(_MAGIC) + _NONCE :], _MAGIC + purpose)
    except InvalidTag:
        raise RosterError(f"{where}: wrong key or damaged file (authentication failed)") from None
    result: dict[str, Any] = json.loads(body)
    return result


def write_private(path: Path, data: bytes) -> None:
    """Write atomically (a crash leaves the old file) with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a crash's leftover could carry a wider mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -- the store ----------------------------------------------------------------------------


@dataclass
class Enrolled:
    id: str
    name: str
    class_name: str
    consent: bool
    embeddings: list[Embedding] = field(default_factory=list)
    enrolled_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "class": self.class_name,
            "consent": self.consent,
            "embeddings": [[round(float(v), 6) for v in e] for e in self.embeddings],
            "enrolled_at": self.enrolled_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Enrolled:
        return cls(
            id=data["id"],
            name=data["name"],
            class_name=data["class"],
            consent=bool(data["consent"]),
            embeddings=[np.asarray(e, np.float32) for e in data["embeddings"]],
            enrolled_at=float(data["enrolled_at"]),
        )


class RosterStore:
    """The enrolled students of this room, encrypted at rest."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.directory = directory
        self.path = directory / STORE_FILE
        self._key = key
        self.students: dict[str, Enrolled] = {}
        if self.path.exists():
            data = unseal(key, self.path.read_bytes(), b"roster", str(self.path))
            self.students = {s["id"]: Enrolled.from_dict(s) for s in data["students"]}

    def __repr__(self) -> str:  # never the key
        return f"RosterStore({self.directory}, {len(self.students)} students)"

    def save(self) -> None:
        payload = {"version": 1, "students": [s.to_dict() for s in self.students.values()]}
        write_private(self.path, seal(self._key, payload, b"roster"))

    def put(self, student: Enrolled) -> None:
        self.students[student.id] = student

    def remove(self, student_id: str) -> bool:
        return self.students.pop(student_id, None) is not None

    def gallery(self, max_distance: float) -> Gallery:
        """Consenting students with at least one embedding."""
        return Gallery(
            {s.id: s.embeddings for s in self.students.values() if s.consent and s.embeddings},
            max_distance,
        )

    def seal_record(
        self, name: str, payload: dict[str, Any], kind: RecordKind = "attendance"
    ) -> Path:
        """Write one lesson's record of ``kind`` (its own folder), sealed with the store's key."""
        path = self._record_file(name, kind)
        if path is None:  # lesson ids are checked upstream; be sure
            raise RosterError(f"{name!r}: not a record name (letters, digits, - and _)")
        write_private(path, seal(self._key, payload, kind.encode()))
        return path

    def open_record(self, path: Path) -> dict[str, Any]:
        """A sealed record; its kind (the purpose it was sealed for) is its folder's name."""
        kind = path.parent.name
        if kind not in RECORD_KINDS:
            raise RosterError(f"{path}: not in a record folder ({', '.join(RECORD_KINDS)})")
        return unseal(self._key, path.read_bytes(), kind.encode(), str(path))

    def record_path(self, name: str, kind: RecordKind = "attendance") -> Path | None:
        """Where lesson ``name``'s record of ``kind`` is, or None when there is none."""
        path = self._record_file(name, kind)
        return path if path is not None and path.is_file() else None

    def _record_file(self, name: str, kind: RecordKind) -> Path | None:
        """The file of lesson ``name``'s record of ``kind``; None for a name that is not one."""
        if not RECORD_NAME.fullmatch(name):
            return None
        return self.directory / kind / f"{name}.enc"

    def update_record(
        self,
        name: str,
        kind: RecordKind,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> dict[str, Any] | None:
        """Open lesson ``name``'s record of ``kind``, ``change`` it and seal it again, all
        under an exclusive lock on the kind's folder, so two writers (the panel's
        corrections, a purge from the command line) never lose each other's change.

        ``change`` returns the new payload, or None to leave the record as it is (what
        this returns then). The file keeps its modification time: retention and the
        records' order go by it. RosterError when there is no such record."""
        with self.locked(kind):
            path = self.record_path(name, kind)
            if path is None:
                raise RosterError(f"{name}: no {kind} record in {self.directory / kind}")
            changed = change(self.open_record(path))
            if changed is None:
                return None
            before = path.stat()
            self.seal_record(name, changed, kind)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            return changed

    @contextlib.contextmanager
    def locked(self, kind: RecordKind) -> Iterator[None]:
        """An exclusive lock on the kind's folder (flock: it goes with the process), held
        by every writer that reads a record before it rewrites or deletes it."""
        folder = self.directory / kind
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise RosterError(f"{folder}: no {kind} records here") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def records(self, kind: RecordKind = "attendance") -> list[Path]:
        """The sealed records of ``kind``, oldest first."""
        folder = self.directory / kind
        if not folder.is_dir():
            return []
        return sorted(folder.glob("*.enc"), key=lambda p: p.stat().st_mtime)


def store_directory(config: AgentConfig) -> Path:
    """The folder of the room's roster store and lesson records."""
    return config.sensing.roster_dir or config.supervisor.state_dir / "sensing"


def open_store(
    directory: Path, *, key_file: Path | None = None, create: bool = False
) -> RosterStore:
    if not create and not (directory / STORE_FILE).exists():
        raise RosterError(
            f"{directory}: no roster store here (enrol one: classroom-agent roster enroll)"
        )
    return RosterStore(directory, load_key(directory, key_file, create=create))


def now() -> float:
    return time.time()

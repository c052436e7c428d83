"""The device's side of pushed profiles: what it verified, applied, refused, and why.

`ProfileBook` holds one device's view: the pinned keys (the site file's, or the set a
threshold-signed ``keys`` document installed), the applied envelope of every layer it
belongs to (fleet < school < group < room), the highest version seen per layer (so an
older or equal one is a replay), the audit log, and the report it publishes on its
retained ``config/reported`` topic. Everything is persisted under
``<state_dir>/profiles/`` with atomic writes: a crash leaves the old file or the new one.

A change is applied on trial: ``begin_trial`` records the layer and version first; if the
agent dies before ``end_trial``, the next start finds the marker and treats that version
as rolled back (never retried), so a profile that crashes the agent cannot loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.contracts import iso_time
from agent.files import remove_durably, write_atomic
from agent.sync.envelope import (
    Envelope,
    Keyring,
    Reason,
    Rejected,
    check_scope,
    check_time,
    device_layers,
    in_wave,
    layer_sort_key,
    parse_envelope,
)

log = logging.getLogger(__name__)

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")


class LayerState(StrEnum):
    PENDING = "pending"  # received, being checked or applied
    WAITING = "waiting"  # valid, not in the rollout wave yet, or a live lesson delays it
    APPLIED = "applied"
    REJECTED = "rejected"  # refused before it touched anything
    ROLLED_BACK = "rolled-back"  # applied, then put back because the check failed
    EXPIRED = "expired"  # was applied, its expiry passed: the layer is dropped
    DROPPED = "dropped"  # was applied, its key is no longer pinned: the layer is dropped
    CLEARED = "cleared"  # IT removed the layer's profile


@dataclass
class LayerReport:
    """The device's answer for one layer, as ``config/reported`` carries it."""

    state: LayerState
    version: int | None = None  # the document this answer is about
    scope: str | None = None
    reason: str = ""
    code: str = ""  # a `Reason` value for refusals
    since: float = field(default_factory=time.time)
    applied_version: int | None = None  # what is in effect in this layer now
    wave: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "version": self.version,
            "scope": self.scope,
            "reason": self.reason,
            "code": self.code,
            "since": iso_time(dt.datetime.fromtimestamp(self.since, dt.UTC)),
            "applied_version": self.applied_version,
            "wave": self.wave,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerReport:
        since = dt.datetime.fromisoformat(str(data["since"])).timestamp()
        return cls(
            LayerState(data["state"]),
            data.get("version"),
            data.get("scope"),
            str(data.get("reason", "")),
            str(data.get("code", "")),
            since,
            data.get("applied_version"),
            data.get("wave"),
        )


def clock_state() -> str:
    """Whether systemd-timesyncd has synchronised the clock (said with time refusals)."""
    return "synchronised (NTP)" if TIMESYNC_FLAG.exists() else "not known to be synchronised"


def _layer_file(layer: str) -> str:
    return layer.replace(":", "_") + ".json"


class ProfileBook:
    """One device's pushed profiles: verification, persistence, reports, history."""

    def __init__(
        self,
        directory: Path,
        *,
        device_id: str,
        groups: Iterable[str],
        site_keys: Keyring,
        max_skew_s: float = 300,
        history_size: int = 200,
    ) -> None:
        self.directory = directory
        self.device_id = device_id
        self.groups = tuple(sorted(set(groups)))
        self.max_skew_s = max_skew_s
        self.history_size = history_size
        self._applied_dir = directory / "applied"
        self._applied_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keyring = load_keyring(directory, site_keys)
        self._site_fingerprint = site_keys.fingerprint()
        state = self._read_json(directory / "state.json") or {}
        self.high_water: dict[str, int] = {
            str(k): int(v) for k, v in dict(state.get("high_water", {})).items()
        }
        self.reports: dict[str, LayerReport] = {}
        for layer, data in dict(state.get("reports", {})).items():
            with contextlib.suppress(KeyError, ValueError, TypeError):
                self.reports[layer] = LayerReport.from_dict(data)
        self.applied: dict[str, Envelope] = {}
        self._history_lines = len(self.read_history())

    # -- the layers ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        return device_layers(self.device_id, self.groups)

    @property
    def enabled(self) -> bool:
        return bool(self.keyring.keys)

    def layer_name(self, envelope: Envelope) -> str:
        """The config layer's name: what ``config show`` prints as a value's source."""
        return f"profile {envelope.scope} v{envelope.version}"

    def load_applied(self, now: float | None = None) -> list[str]:
        """Read the applied envelopes from disk and check each again (at boot, and after a
        key rotation): a retired key or an expiry drops the layer. Returns what changed."""
        now = time.time() if now is None else now
        self._finish_interrupted_trial()
        changes = []
        self.applied = {}
        for layer in self.layers:
            path = self._applied_dir / _layer_file(layer)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                envelope = parse_envelope(raw)
                self._check_signed(envelope, layer)
                check_time(envelope, now, float("inf"), clock_state())
            except Rejected as exc:
                state = LayerState.EXPIRED if exc.reason is Reason.EXPIRED else LayerState.DROPPED
                self._drop(layer, path, state, exc)
                changes.append(layer)
                continue
            self.applied[layer] = envelope
        return changes

    def recheck(self, now: float | None = None) -> list[str]:
        """Drop applied layers that expired or whose key is no longer pinned."""
        now = time.time() if now is None else now
        changes = []
        for layer, envelope in sorted(self.applied.items()):
            try:
                self._check_signed(envelope, layer)
                check_time(envelope, now, float("inf"), clock_state())
            except Rejected as exc:
                state = LayerState.EXPIRED if exc.reason is Reason.EXPIRED else LayerState.DROPPED
                self._drop(layer, self._applied_dir / _layer_file(layer), state, exc)
                del self.applied[layer]
                changes.append(layer)
        return changes

    def next_expiry(self) -> float | None:
        return min((e.expires_at for e in self.applied.values()), default=None)

    def _drop(self, layer: str, path: Path, state: LayerState, exc: Rejected) -> None:
        remove_durably(path)
        old = self.reports.get(layer)
        version = old.applied_version if old else None
        self.report(
            layer,
            LayerReport(state, version, old.scope if old else None, exc.message, exc.reason.value),
        )
        self.history(layer, state, version, exc.message)
        log.warning(
            "dropped the pushed profile of %s: %s",
            layer,
            exc,
            extra={"fields": {"layer": layer, "code": exc.reason.value}},
        )

    def _check_signed(self, envelope: Envelope, layer: str) -> None:
        if envelope.payload_type != "config":
            raise Rejected(
                Reason.WRONG_TYPE,
                f"a {envelope.payload_type} document on a config topic; publish it on its own",
            )
        check_scope(envelope, layer, self.device_id, self.groups)
        self.keyring.verify_single(envelope)

    # -- a document arrives --------------------------------------------------------------------

    def verify(self, layer: str, raw: bytes, now: float | None = None) -> Envelope:
        """Everything but the payload's schema: size, form, type, scope and topic, pinned
        key, signature, newer than every version this layer has seen, time."""
        now = time.time() if now is None else now
        if not self.enabled:
            raise Rejected(
                Reason.UNKNOWN_KEY,
                "this device pins no IT keys (profiles.trusted_keys in the site file is empty)",
            )
        envelope = parse_envelope(raw)
        self._check_signed(envelope, layer)
        seen = self.high_water.get(layer, 0)
        if envelope.version <= seen:
            raise Rejected(
                Reason.REPLAYED,
                f"{envelope.describe()} is not newer than version {seen}, the highest this "
                f"device has seen for {layer}; sign it with --version {seen + 1} or higher",
            )
        check_time(envelope, now, self.max_skew_s, clock_state())
        return envelope

    def in_wave(self, envelope: Envelope) -> bool:
        return in_wave(envelope, self.device_id)

    def seen(self, layer: str, version: int) -> None:
        """Never take this version (or an older one) of the layer again (durably: this is
        what makes a replay fail after a power cut too)."""
        if version > self.high_water.get(layer, 0):
            self.high_water[layer] = version
            self._save_state(durable=True)

    # -- keys ----------------------------------------------------------------------------------

    def accept_keys(self, raw: bytes, now: float | None = None) -> Keyring:
        """A ``keys`` document: threshold-signed by the pinned keys, newer, in time; it
        replaces the pinned set (persisted). `Rejected` otherwise."""
        now = time.time() if now is None else now
        envelope = parse_envelope(raw)
        if envelope.payload_type != "keys":
            raise Rejected(Reason.WRONG_TYPE, "only a 'keys' document belongs on the keys topic")
        if envelope.scope.kind != "fleet":
            raise Rejected(Reason.WRONG_SCOPE, "a keys document is for the whole fleet")
        self.keyring.verify_threshold(envelope)
        if envelope.version <= self.keyring.version:
            raise Rejected(
                Reason.REPLAYED,
                f"keys v{envelope.version} is not newer than the pinned set's v"
                f"{self.keyring.version}",
            )
        check_time(envelope, now, self.max_skew_s, clock_state())
        new = self.keyring.rotated(envelope)
        self.keyring = new
        document = {"based_on": self._site_fingerprint, **new.to_dict()}
        write_atomic(self.directory / "keyring.json", json.dumps(document).encode())
        self.history(
            "keys",
            LayerState.APPLIED,
            envelope.version,
            f"pinned keys now {', '.join(sorted(new.keys))}",
        )
        return new

    # -- applying on trial ---------------------------------------------------------------------

    def begin_trial(self, layer: str, envelope: Envelope) -> None:
        """Before touching anything: remember what is being tried (see the module doc)."""
        marker = {
            "layer": layer,
            "version": envelope.version,
            "scope": str(envelope.scope),
        }
        write_atomic(self.directory / "trial.json", json.dumps(marker).encode())

    def end_trial(self) -> None:
        remove_durably(self.directory / "trial.json")

    def commit(self, layer: str, envelope: Envelope | None) -> None:
        """The change held: persist the layer's new envelope (or its removal)."""
        path = self._applied_dir / _layer_file(layer)
        if envelope is None:
            remove_durably(path)
            self.applied.pop(layer, None)
        else:
            write_atomic(path, envelope.raw)
            self.applied[layer] = envelope
            self.seen(layer, envelope.version)
        self.end_trial()

    def _finish_interrupted_trial(self) -> None:
        marker = self._read_json(self.directory / "trial.json")
        if marker is None:
            return
        layer, version = marker.get("layer"), marker.get("version")
        reason = "the agent stopped while applying it (crash or power cut); not retried"
        if isinstance(layer, str):
            if isinstance(version, int):
                self.seen(layer, version)
            self.report(
                layer,
                LayerReport(
                    LayerState.ROLLED_BACK,
                    version,
                    marker.get("scope"),
                    reason,
                    "interrupted",
                    applied_version=self._applied_version(layer),
                ),
            )
            self.history(layer, LayerState.ROLLED_BACK, version, reason)
            log.error(
                "profile %s v%s was being applied when the agent stopped; kept the previous one",
                layer,
                version,
            )
        self.end_trial()

    def _applied_version(self, layer: str) -> int | None:
        path = self._applied_dir / _layer_file(layer)
        try:
            return parse_envelope(path.read_bytes()).version
        except (OSError, Rejected):
            return None

    # -- reports and history -------------------------------------------------------------------

    def report(self, layer: str, report: LayerReport) -> None:
        if report.applied_version is None and layer in self.applied:
            report.applied_version = self.applied[layer].version
        self.reports[layer] = report
        self._save_state(durable=False)  # an answer is resent anyway; versions are durable

    def reported_document(self, now: float | None = None) -> dict[str, Any]:
        moment = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
        layers = {
            layer: self.reports[layer].to_dict()
            for layer in sorted(self.reports, key=layer_sort_key)
            if layer in self.layers
        }
        return {
            "v": 1,
            "device": self.device_id,
            "groups": list(self.groups),
            "time": iso_time(moment),
            "keys": {
                "version": self.keyring.version,
                "pinned": sorted(self.keyring.keys),
                "last": self.reports["keys"].to_dict() if "keys" in self.reports else None,
            },
            "effective": {
                layer: self.applied[layer].version
                for layer in sorted(self.applied, key=layer_sort_key)
            },
            "layers": layers,
        }

    def history(self, layer: str, state: LayerState, version: int | None, reason: str) -> None:
        entry = {
            "time": iso_time(dt.datetime.now(dt.UTC)),
            "layer": layer,
            "state": state.value,
            "version": version,
            "reason": reason,
        }
        path = self.directory / "history.jsonl"
        with path.open("a", encoding="utf-8") as handle:  # an append, not a rewrite
            handle.write(json.dumps(entry) + "\n")
            self._history_lines += 1
        if self._history_lines > 2 * self.history_size:  # trimmed now and then
            kept = self.read_history()[-self.history_size :]
            write_atomic(path, "".join(json.dumps(e) + "\n" for e in kept).encode())
            self._history_lines = len(kept)

    def read_history(self) -> list[dict[str, Any]]:
        """The audit log, oldest first, at most ``history_size`` entries."""
        try:
            text = (self.directory / "history.jsonl").read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        entries = []
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries[-self.history_size :]

    # -- persistence ---------------------------------------------------------------------------

    def _save_state(self, *, durable: bool) -> None:
        document = {
            "high_water": self.high_water,
            "reports": {layer: report.to_dict() for layer, report in self.reports.items()},
        }
        write_atomic(self.directory / "state.json", json.dumps(document).encode(), durable=durable)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)
            return None
        return data if isinstance(data, dict) else None


PROFILES_DIR = "profiles"  # under supervisor.state_dir


def profiles_directory(state_dir: Path) -> Path:
    path = state_dir / PROFILES_DIR
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def load_keyring(directory: Path, site_keys: Keyring) -> Keyring:
    """The IT keys this device trusts now: a set rotated by a threshold-signed ``keys``
    document (persisted in ``directory``), or the site file's. If IT changed the site
    file's pinned keys by hand since the rotation, those are the new root."""
    data = ProfileBook._read_json(directory / "keyring.json")
    if not data:
        return site_keys
    if data.get("based_on") != site_keys.fingerprint():
        log.warning(
            "the site file pins other keys than the rotated set was based on; using the site file's"
        )
        return site_keys
    try:
        return Keyring.from_dict(data)
    except (KeyError, ValueError, TypeError) as exc:
        log.error("ignoring an unreadable rotated key set: %s", exc)
        return site_keys

"""Retention and a student's rights over what the device holds about them.

- ``purge_student``: the right to erasure. The student's roster entry (name, consent,
  face embeddings) and every entry of theirs in the sealed attendance and report records
  are removed; each changed record is sealed again (atomically, its mtime kept). A
  record is walked as JSON: any key equal to the id, any object whose ``"student"`` is
  the id, and any string equal to it go (a string that is an object's value, other than
  ``"student"``, becomes null so the record keeps its shape). A lesson's counts stay:
  they are figures of the lesson, already sent as such.
- ``purge_before`` / ``purge_expired``: retention. Whole records of lessons that ended
  before a cutoff are deleted (their ``end``; the file's mtime when it cannot be read).
- ``export_student``: the right of access: the roster entry (without the embedding
  vectors, with how many are held) and every entry of theirs in every record, by lesson.

Every purge is logged with counts and lesson ids only: never a student id, name or
embedding, so the log does not keep what the purge removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.sensing.roster import RECORD_KINDS, RecordKind, RosterError, RosterStore

log = logging.getLogger(__name__)

DAY_S = 86400
STALE_TEMP_S = 300  # a write_private temporary this old was left by a crash, not a writer


@dataclass
class PurgeReport:
    """What a purge removed: counts and lesson ids, never the data."""

    roster_entries: int = 0
    embeddings: int = 0
    attendance_entries: int = 0
    report_entries: int = 0
    resealed: dict[str, list[str]] = field(default_factory=dict)  # kind -> lesson ids
    deleted: dict[str, list[str]] = field(default_factory=dict)  # kind -> lesson ids
    # "kind/lesson": records not opened (a student purge could not search them; retention
    # went by their mtime, as it does for a readable record without an end)
    unreadable: list[str] = field(default_factory=list)
    leftovers: int = 0  # temporaries a crashed write left behind, deleted

    @property
    def found(self) -> bool:
        """Whether the purge found anything of the student's to remove."""
        return bool(self.roster_entries or self.attendance_entries or self.report_entries)

    def fields(self) -> dict[str, Any]:
        return {
            "roster_entries": self.roster_entries,
            "embeddings": self.embeddings,
            "attendance_entries": self.attendance_entries,
            "report_entries": self.report_entries,
            "resealed": self.resealed,
            "deleted": self.deleted,
            "unreadable": self.unreadable,
            "leftovers": self.leftovers,
        }


def find_student(value: Any, student_id: str, at: str = "") -> tuple[Any, list[dict[str, Any]]]:
    """``value`` without the student's entries, and those entries (``at``: where each was).

    The one walk behind both the purge and the export, so an export shows exactly what a
    purge removes.
    """
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        kept: dict[str, Any] = {}
        for key, item in value.items():
            where = f"{at}.{key}" if at else str(key)
            if key == student_id or _is_theirs(item, student_id):
                found.append({"at": where, "value": item})
                continue
            if item == student_id:
                found.append({"at": where, "value": item})
                kept[key] = None
                continue
            kept[key], inner = find_student(item, student_id, where)
            found += inner
        return kept, found
    if isinstance(value, list):
        items: list[Any] = []
        for index, item in enumerate(value):
            where = f"{at}[{index}]"
            if item == student_id or _is_theirs(item, student_id):
                found.append({"at": where, "value": item})
                continue
            new, inner = find_student(item, student_id, where)
            items.append(new)
            found += inner
        return items, found
    return value, found


def _is_theirs(item: Any, student_id: str) -> bool:
    return isinstance(item, dict) and item.get("student") == student_id


def _records(store: RosterStore) -> list[tuple[RecordKind, Path]]:
    return [(kind, path) for kind in RECORD_KINDS for path in store.records(kind)]


def _open(store: RosterStore, path: Path) -> dict[str, Any] | None:
    try:
        return store.open_record(path)
    except (RosterError, OSError, ValueError):  # ValueError: JSON of a damaged body
        return None


def _lesson_time(payload: dict[str, Any], which: str) -> float | None:
    """The record's ``start`` or ``end``: at its top, else in its ``attendance``."""
    for holder in (payload, payload.get("attendance")):
        if isinstance(holder, dict):
            value = holder.get(which)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
    return None


def _remove_leftovers(store: RosterStore, now: float) -> int:
    """Delete temporaries of writes a crash interrupted (they may hold a whole roster)."""
    removed = 0
    for folder in (store.directory, *(store.directory / kind for kind in RECORD_KINDS)):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_S:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished after all
                continue
    return removed


def purge_student(store: RosterStore, student_id: str) -> PurgeReport:
    """Erase the student: roster entry and embeddings, their entries in every record."""
    report = PurgeReport()
    enrolled = store.students.get(student_id)
    if enrolled is not None:
        report.roster_entries = 1
        report.embeddings = len(enrolled.embeddings)
        store.remove(student_id)
        store.save()
    found: list[dict[str, Any]] = []  # the student's entries in the record at hand

    def without(payload: dict[str, Any]) -> dict[str, Any] | None:
        kept, found[:] = find_student(payload, student_id)
        return kept if found else None

    for kind, path in _records(store):
        lesson = path.stem
        found.clear()
        try:
            # Under the records' lock: a correction made on the panel meanwhile is not
            # lost, and cannot bring the student back.
            store.update_record(lesson, kind, without)
        except (RosterError, OSError, ValueError):  # ValueError: JSON of a damaged body
            report.unreadable.append(f"{kind}/{lesson}")
            continue
        if not found:
            continue
        report.resealed.setdefault(kind, []).append(lesson)
        if kind == "attendance":
            report.attendance_entries += len(found)
        else:
            report.report_entries += len(found)
    report.leftovers = _remove_leftovers(store, time.time())
    log.info(
        "privacy: a student's data purged: %d roster entry, %d embeddings, %d attendance "
        "and %d report entries in %d records",
        report.roster_entries,
        report.embeddings,
        report.attendance_entries,
        report.report_entries,
        sum(len(v) for v in report.resealed.values()),
        extra={"fields": {"purge": "student", **report.fields()}},
    )
    return report


def purge_before(store: RosterStore, cutoff_epoch: float) -> PurgeReport:
    """Delete the records (attendance and report) of lessons that ended before the cutoff."""
    report = PurgeReport()
    for kind, path in _records(store):
        try:
            # Under the records' lock: a correction saved meanwhile on the panel cannot
            # write back a record this deletes.
            with store.locked(kind):
                if _expired(store, kind, path, cutoff_epoch, report):
                    path.unlink(missing_ok=True)
                    report.deleted.setdefault(kind, []).append(path.stem)
        except RosterError:  # the folder went meanwhile: nothing left to delete
            continue
    log.info(
        "privacy: %d records of lessons that ended before %s deleted",
        sum(len(v) for v in report.deleted.values()),
        time.strftime("%Y-%m-%d %H:%M", time.localtime(cutoff_epoch)),
        extra={"fields": {"purge": "before", "cutoff": cutoff_epoch, **report.fields()}},
    )
    return report


def _expired(
    store: RosterStore, kind: str, path: Path, cutoff_epoch: float, report: PurgeReport
) -> bool:
    """Whether the record's lesson ended before the cutoff (by the file's time when the
    record cannot be opened, which ``report`` notes)."""
    payload = _open(store, path)
    end = None if payload is None else _lesson_time(payload, "end")
    if end is None:
        report.unreadable.append(f"{kind}/{path.stem}")
        try:
            end = path.stat().st_mtime
        except FileNotFoundError:
            return False
    return end < cutoff_epoch


def purge_expired(store: RosterStore, retention_days: int, now: float) -> PurgeReport:
    """Retention (``privacy.retention_days``): the records older than that many days."""
    return purge_before(store, now - retention_days * DAY_S)


def export_student(store: RosterStore, student_id: str) -> dict[str, Any]:
    """Everything the device holds about the student, for them or their guardian.

    ``roster``: the entry without the embedding vectors (``embeddings_held``: how many),
    or None; ``attendance`` and ``reports``: one item a lesson that holds an entry of
    theirs (lesson id, start, end, and each entry with where it sits in the record);
    ``unreadable``: records that could not be opened, so could not be searched.
    """
    enrolled = store.students.get(student_id)
    roster = None
    if enrolled is not None:
        roster = {key: value for key, value in enrolled.to_dict().items() if key != "embeddings"}
        roster["embeddings_held"] = len(enrolled.embeddings)
    result: dict[str, Any] = {
        "student": student_id,
        "exported_at": time.time(),
        "roster": roster,
        "attendance": [],
        "reports": [],
        "unreadable": [],
    }
    for kind, path in _records(store):
        payload = _open(store, path)
        if payload is None:
            result["unreadable"].append(f"{kind}/{path.stem}")
            continue
        _, found = find_student(payload, student_id)
        if not found:
            continue
        item = {
            "lesson": path.stem,
            "start": _lesson_time(payload, "start"),
            "end": _lesson_time(payload, "end"),
            "entries": found,
        }
        result["attendance" if kind == "attendance" else "reports"].append(item)
    return result


def holds_student(export: dict[str, Any]) -> bool:
    """Whether an ``export_student`` result found anything of the student's."""
    return bool(export["roster"] or export["attendance"] or export["reports"])

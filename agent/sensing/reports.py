"""The room's lesson reports as the teacher's panel lists, shows and corrects them.

Every call opens the store afresh (a roster enrolled since, or a purge from the command
line, shows at once) and is blocking: decrypting and sealing are file work, so callers
on an event loop run them in a thread. A correction is one read-change-seal under the
records' lock (`RosterStore.update_record`): two at once both land, and a purge running
beside it cannot be undone by it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.contracts import is_lesson_id
from agent.sensing.report import add_correction, report_row
from agent.sensing.roster import RosterError, RosterStore, open_store, store_directory

log = logging.getLogger(__name__)


class ReportNotFound(LookupError):
    """No such report (or none at all); the text says why and what to do."""


def open_reports(store_dir: Path, key_file: Path | None) -> RosterStore:
    """The store holding the reports: one without a roster still has its key."""
    if not (store_dir / "report").is_dir():
        raise RosterError(f"{store_dir}: no lesson reports here yet (a lesson with sensing on)")
    return open_store(store_dir, key_file=key_file, create=True)


def report_rows(
    store: RosterStore, unreadable: Callable[[Path, Exception], None]
) -> list[dict[str, Any]]:
    """Every report's list row (`report_row`: corrected counts, no student), newest
    lesson first; a record that cannot be opened is told to ``unreadable`` and left out."""
    rows = []
    for path in store.records("report"):
        try:
            rows.append(report_row(store.open_record(path)))
        except (RosterError, ValueError, KeyError) as exc:
            unreadable(path, exc)
    return sorted(rows, key=lambda row: row["start"], reverse=True)


def roster_names(store: RosterStore) -> dict[str, str]:
    """Student id -> display name, from the roster (a report holds no names)."""
    return {s.id: s.name for s in store.students.values()}


@dataclass(frozen=True)
class LessonReports:
    """The reports in ``directory`` (the sensing store), sealed with its key."""

    directory: Path
    key_file: Path | None = None

    @classmethod
    def of(cls, config: AgentConfig) -> LessonReports:
        # Not sensing.enabled: turning sensing on or off must not restart the teacher's
        # panel, and the reports of earlier lessons stay readable with it off.
        return cls(store_directory(config), config.sensing.key_file)

    def rows(self) -> list[dict[str, Any]]:
        """Every report's list row (`report_row`), newest lesson first; [] when there
        are none. A record that cannot be opened is logged and left out."""
        if not (self.directory / "report").is_dir():
            return []

        def unreadable(path: Path, exc: Exception) -> None:
            log.warning("lesson report %s left out of the list: %s", path.name, exc)

        return report_rows(self._store(), unreadable)

    def read(self, lesson: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Lesson ``lesson``'s report and the roster's names."""
        store = self._store()
        path = store.record_path(self._checked(lesson), "report")
        if path is None:
            raise ReportNotFound(self._missing(lesson))
        return store.open_record(path), roster_names(store)

    def correct(
        self,
        lesson: str,
        student: str,
        status: str,
        *,
        at: float,
        by: str,
        source: str,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Append the teacher's correction (`add_correction`) and seal the report again,
        under the records' lock; the corrected report and the names. CorrectionRefused
        for a student the report does not hold."""
        store = self._store()
        self._checked(lesson)
        if store.record_path(lesson, "report") is None:
            raise ReportNotFound(self._missing(lesson))

        def corrected(report: dict[str, Any]) -> dict[str, Any]:
            return add_correction(report, student, status, at=at, by=by, source=source)

        report = store.update_record(lesson, "report", corrected)
        assert report is not None  # corrected() always changes it
        log.info(
            "lesson %s: attendance corrected on the panel (%s from %s)",
            lesson,
            by,
            source,
            extra={"fields": {"lesson": lesson, "by": by, "from": source}},
        )
        return report, roster_names(store)

    def _store(self) -> RosterStore:
        if not (self.directory / "report").is_dir():
            raise ReportNotFound(
                "no lesson reports in this room yet: one is made when a lesson ends with "
                "sensing on (sensing.enabled: true)"
            )
        return open_reports(self.directory, self.key_file)

    @staticmethod
    def _checked(lesson: str) -> str:
        if not is_lesson_id(lesson):  # the panel checks first; this keeps the store's names
            raise ReportNotFound(f"lesson: {lesson[:80]!r} is not a lesson id")
        return lesson

    @staticmethod
    def _missing(lesson: str) -> str:
        return f"lesson {lesson}: no report in this room (GET /api/reports lists them)"

"""Retention and a student's rights: purge a student, purge old records, export a student.

A real store with a real key, students with synthetic embeddings (purging runs no
model), and real sealed attendance and report records; after a purge every file under
the store is decrypted with the key and searched.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli import main
from agent.config.models import PrivacyConfig
from agent.sensing.privacy import export_student, purge_before, purge_expired, purge_student
from agent.sensing.roster import Enrolled, RosterStore, load_key, open_store, unseal

GONE, KEPT, OTHER = "s-purge", "s-keep", "s-other"
NAMES = {GONE: "王小明", KEPT: "李华", OTHER: "Zoë"}
LESSONS = {  # lesson id -> when it ended (local time)
    "lesson-old": datetime.datetime(2025, 3, 3, 8, 45),
    "lesson-mid": datetime.datetime(2025, 5, 1, 8, 45),
    "lesson-new": datetime.datetime(2025, 6, 2, 9, 40),
}


def _embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.3, 0.3, 128).astype(np.float32)


def _attendance(lesson: str, end: float) -> dict[str, Any]:
    """A record as ``Attendance.finish`` writes it."""
    start = end - 45 * 60
    present = {"late": False, "left_early": False, "first_seen_min": 0.5}
    return {
        "lesson": lesson,
        "start": start,
        "end": end,
        "students": {
            GONE: {"status": "present", **present, "last_seen_min": 44.0, "confidence": 0.9},
            KEPT: {"status": "present", **present, "last_seen_min": 43.5, "confidence": 0.8},
            OTHER: {"status": "absent", "confidence": 0.0},
        },
        "counts": {"present": 2, "late": 0, "left_early": 0, "absent": 1},
        "unknown": 1,
    }


def _report(lesson: str, end: float) -> dict[str, Any]:
    """A lesson report (as agent/sensing/report.py's ``report_record``): its attendance,
    the teacher's corrections, and other places an id can sit (the purge walks it all)."""
    attendance = _attendance(lesson, end)
    return {
        "v": 1,
        "lesson": lesson,
        "start": attendance["start"],
        "end": end,
        "minutes": [{"minute_start": end - 60, "head_count": 3, "present": 2}],
        "attendance": {k: attendance[k] for k in ("students", "counts", "unknown")},
        "corrections": [
            {"student": GONE, "status": "late", "by": "teacher"},
            {"student": KEPT, "status": "present", "by": "teacher"},
        ],
        "talk": {"turns": {GONE: 3, KEPT: 1}, "first": {"student": GONE, "at_min": 2.0}},
        "answered": [GONE, KEPT],
        "top": GONE,
    }


def _make_store(directory: Path) -> RosterStore:
    store = open_store(directory, create=True)
    for seed, (student, name) in enumerate(NAMES.items()):
        embeddings = [_embedding(10 * seed), _embedding(10 * seed + 1)]
        store.put(Enrolled(student, name, "grade-3", True, embeddings, 1.7e9))
    store.save()
    for lesson, ended in LESSONS.items():
        end = ended.timestamp()
        for path in (
            store.seal_record(lesson, _attendance(lesson, end), "attendance"),
            store.seal_record(lesson, _report(lesson, end), "report"),
        ):
            os.utime(path, (end, end))
    return store


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "store"
    _make_store(directory)
    return directory


def _contents(directory: Path) -> dict[Path, bytes]:
    """Every file under the store: its bytes, and for a sealed one its plaintext too."""
    key = load_key(directory)
    found: dict[Path, bytes] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        if raw.startswith(b"CEAS1"):
            purpose = b"roster" if path.parent == directory else path.parent.name.encode()
            payload = unseal(key, raw, purpose, str(path))
            for ascii_only in (True, False):
                raw += json.dumps(payload, separators=(",", ":"), ensure_ascii=ascii_only).encode()
        found[path] = raw
    return found


def _needles(student: str, embedding: np.ndarray) -> list[bytes]:
    value = float(embedding[0])
    return [
        student.encode(),
        NAMES[student].encode(),
        json.dumps(NAMES[student]).strip('"').encode(),  # as JSON escapes it
        json.dumps(round(value, 6)).encode(),  # as the store writes it
        embedding[:2].tobytes(),  # the raw float32 bytes
        np.float64(value).tobytes(),
    ]


def _holders(directory: Path, needles: list[bytes]) -> set[tuple[str, bytes]]:
    return {
        (str(path.relative_to(directory)), needle)
        for path, data in _contents(directory).items()
        for needle in needles
        if needle in data
    }


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_purging_a_student_leaves_nothing_of_theirs_in_any_file(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = open_store(store_dir)
    gone = _needles(GONE, before.students[GONE].embeddings[1])
    kept = _needles(KEPT, before.students[KEPT].embeddings[0])
    # What a write that crashed an hour ago left behind (write_private's temporary).
    leftover = store_dir / "attendance" / ".lesson-crashed.enc.tmp"
    leftover.write_bytes((store_dir / "attendance" / "lesson-new.enc").read_bytes())
    leftover.chmod(0o600)
    os.utime(leftover, (leftover.stat().st_mtime - 3600,) * 2)
    # The search finds them before: in the roster, and in all six records.
    assert {p for p, _ in _holders(store_dir, gone)} == {
        "roster.enc",
        "attendance/.lesson-crashed.enc.tmp",
        *(f"{kind}/{lesson}.enc" for kind in ("attendance", "report") for lesson in LESSONS),
    }
    rows = {p.stem: before.open_record(p)["students"][KEPT] for p in before.records()}

    code, out, err = _run(capsys, "privacy", "purge", "--student", GONE, "--store", str(store_dir))
    assert code == 0, err
    assert f"{GONE}: purged: roster entry and 2 embedding(s); 3 attendance row(s)" in out
    assert "6 record(s) sealed again" in out

    assert _holders(store_dir, gone) == set()
    assert not leftover.exists()
    # The other students are untouched: enrolled, embeddings, rows, corrections.
    after = open_store(store_dir)
    assert set(after.students) == {KEPT, OTHER}
    for student in (KEPT, OTHER):
        assert after.students[student].to_dict() == before.students[student].to_dict()
    assert {p for p, n in _holders(store_dir, kept) if n == KEPT.encode()} == {
        "roster.enc",
        *(f"{kind}/{lesson}.enc" for kind in ("attendance", "report") for lesson in LESSONS),
    }
    for path in after.records():
        record = after.open_record(path)
        assert set(record["students"]) == {KEPT, OTHER}
        assert record["students"][KEPT] == rows[path.stem]
        assert record["counts"] == {"present": 2, "late": 0, "left_early": 0, "absent": 1}
    for path in after.records("report"):
        report = after.open_record(path)
        assert set(report["attendance"]["students"]) == {KEPT, OTHER}
        assert report["corrections"] == [{"student": KEPT, "status": "present", "by": "teacher"}]
        assert report["talk"] == {"turns": {KEPT: 1}}
        assert report["answered"] == [KEPT]
        assert report["top"] is None
        assert report["lesson"] == path.stem
    # Still 0600 and still readable; purging again finds nothing.
    for path in [*after.records(), *after.records("report"), store_dir / "roster.enc"]:
        assert path.stat().st_mode & 0o777 == 0o600
    code, _, err = _run(capsys, "privacy", "purge", "--student", GONE, "--store", str(store_dir))
    assert code == 1
    assert f"{GONE}: unknown student" in err


def test_a_purge_reports_counts_keeps_record_times_and_logs_no_personal_data(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(store_dir)
    mtimes = {p: p.stat().st_mtime for p in store.records()}
    # Removed from the roster earlier (`roster remove`): the records still held the id.
    store.remove(GONE)
    store.save()
    caplog.set_level(logging.INFO, logger="agent.sensing.privacy")
    report = purge_student(open_store(store_dir), GONE)
    assert (report.roster_entries, report.embeddings) == (0, 0)
    assert report.attendance_entries == 3
    # A report: its attendance row, one correction, a talk key, the first speaker, an
    # answered list item and the "top" value, in each of the three reports.
    assert report.report_entries == 3 * 6
    assert sorted(report.resealed["report"]) == sorted(LESSONS)
    assert report.unreadable == []
    assert {p: p.stat().st_mtime for p in store.records()} == mtimes  # retention's order
    (record,) = caplog.records
    text = record.getMessage() + json.dumps(record.fields)  # type: ignore[attr-defined]
    assert "3 attendance and 18 report entries in 6 records" in text
    for secret in (GONE, NAMES[GONE], "王"):
        assert secret not in text
    assert "lesson-old" in text  # lesson ids are fine


def test_purge_before_deletes_only_the_records_of_lessons_that_ended_earlier(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Records whose end cannot be read go by their file's mtime.
    damaged_old = store_dir / "attendance" / "lesson-damaged-old.enc"
    damaged_old.write_bytes(b"CEAS1" + os.urandom(64))
    os.utime(damaged_old, (LESSONS["lesson-old"].timestamp(),) * 2)
    damaged_new = store_dir / "report" / "lesson-damaged-new.enc"
    damaged_new.write_bytes(b"not sealed at all")
    code, out, err = _run(
        capsys, "privacy", "purge", "--before", "2025-05-01", "--store", str(store_dir)
    )
    assert code == 0, err
    assert "deleted 3 record(s) of lessons that ended before 2025-05-01" in out
    assert "(attendance 2, report 1)" in out
    left = sorted(str(p.relative_to(store_dir)) for p in store_dir.rglob("*.enc"))
    assert left == [
        "attendance/lesson-mid.enc",
        "attendance/lesson-new.enc",
        "report/lesson-damaged-new.enc",
        "report/lesson-mid.enc",
        "report/lesson-new.enc",
        "roster.enc",
    ]
    assert set(open_store(store_dir).students) == set(NAMES)  # enrolment is not a record


def test_purge_expired_counts_retention_days_back_from_now(store_dir: Path) -> None:
    store = open_store(store_dir)
    now = datetime.datetime(2025, 6, 5, 12, 0).timestamp()
    report = purge_expired(store, 30, now)  # cutoff 6 May: old and mid go
    assert {k: sorted(v) for k, v in report.deleted.items()} == {
        "attendance": ["lesson-mid", "lesson-old"],
        "report": ["lesson-mid", "lesson-old"],
    }
    assert [p.stem for p in store.records()] == ["lesson-new"]
    assert purge_before(store, 0).deleted == {}
    assert PrivacyConfig().retention_days == 30


def test_export_holds_the_students_rows_and_entries_but_no_embedding(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "export.json"
    code, _, err = _run(
        capsys,
        "privacy",
        "export",
        "--student",
        GONE,
        "--store",
        str(store_dir),
        "--out",
        str(out_file),
    )
    assert code == 0, err
    assert out_file.stat().st_mode & 0o777 == 0o600
    text = out_file.read_text(encoding="utf-8")
    assert NAMES[GONE] in text  # ensure_ascii=False: readable Chinese
    export = json.loads(text)
    assert export["student"] == GONE
    roster = export["roster"]
    assert roster["name"] == NAMES[GONE]
    assert roster["embeddings_held"] == 2
    assert "embeddings" not in roster
    embedding = open_store(store_dir).students[GONE].embeddings[0]
    assert json.dumps(round(float(embedding[0]), 6)) not in text
    assert sorted(a["lesson"] for a in export["attendance"]) == sorted(LESSONS)
    for item in export["attendance"]:
        assert item["end"] == LESSONS[item["lesson"]].timestamp()
        assert item["entries"] == [
            {"at": f"students.{GONE}", "value": _attendance("x", 0)["students"][GONE]}
        ]
    for item in export["reports"]:
        assert item["end"] == LESSONS[item["lesson"]].timestamp()
        assert item["start"] == item["end"] - 45 * 60
        found = {entry["at"]: entry["value"] for entry in item["entries"]}
        assert found[f"attendance.students.{GONE}"]["status"] == "present"
        assert found["corrections[0]"] == {"student": GONE, "status": "late", "by": "teacher"}
        assert set(found) == {
            f"attendance.students.{GONE}",
            "corrections[0]",
            f"talk.turns.{GONE}",
            "talk.first",
            "answered[0]",
            "top",
        }
    assert KEPT not in text
    assert NAMES[KEPT] not in text
    again = export_student(open_store(store_dir), GONE)
    assert isinstance(again.pop("exported_at"), float)
    export.pop("exported_at")
    assert export == again
    # Never over an existing file; to stdout without --out.
    code, _, err = _run(
        capsys,
        "privacy",
        "export",
        "--student",
        GONE,
        "--store",
        str(store_dir),
        "--out",
        str(out_file),
    )
    assert code == 1
    assert f"{out_file}: exists; refusing to overwrite" in err
    code, out, _ = _run(capsys, "privacy", "export", "--student", KEPT, "--store", str(store_dir))
    assert code == 0
    assert json.loads(out)["roster"]["name"] == NAMES[KEPT]


def test_bad_inputs_are_refused_with_what_to_fix(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ("2025-13-01", "1/5/2025", "yesterday"):
        with pytest.raises(SystemExit) as exited:
            main(["privacy", "purge", "--before", bad, "--store", str(store_dir)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --before: {bad!r} is not a date: YYYY-MM-DD" in err
    with pytest.raises(SystemExit) as exited:
        main(["privacy", "purge", "--student", GONE, "--before", "2025-01-01"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    for action in ("purge", "export"):
        code, _, err = _run(
            capsys, "privacy", action, "--student", "s-nobody", "--store", str(store_dir)
        )
        assert code == 1
        assert "s-nobody: unknown student: not enrolled and in no record" in err
    empty = tmp_path / "empty"
    code, _, err = _run(capsys, "privacy", "purge", "--student", GONE, "--store", str(empty))
    assert code == 1
    assert f"{empty}: no roster store here" in err
    # The store from the site file (-c): supervisor.state_dir/sensing, as `sensing attendance`.
    state = tmp_path / "state"
    site = tmp_path / "agent.yaml"
    site.write_text(
        f"identity: {{site: school1, room: room1}}\nsupervisor: {{state_dir: {state}}}\n"
    )
    code, _, err = _run(capsys, "privacy", "export", "--student", GONE, "-c", str(site))
    assert code == 1
    assert f"{state / 'sensing'}: no roster store here" in err
    _make_store(state / "sensing")
    code, out, err = _run(capsys, "privacy", "purge", "--student", GONE, "-c", str(site))
    assert code == 0, err
    assert f"{GONE}: purged: roster entry and 2 embedding(s)" in out
    assert GONE not in open_store(state / "sensing").students
    # A record this key cannot open: the purge says it could not search it.
    (state / "sensing" / "report" / "foreign.enc").write_bytes(b"CEAS1" + os.urandom(64))
    code, _, err = _run(capsys, "privacy", "purge", "--student", KEPT, "-c", str(site))
    assert code == 1
    assert "1 record(s) could not be opened with this key, so were not searched" in err
    assert "report/foreign" in err


def test_enrolment_is_refused_when_face_recognition_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert PrivacyConfig().face_recognition is True
    with pytest.raises(ValueError, match="store_face_embeddings"):
        PrivacyConfig.model_validate({"store_face_embeddings": True})
    site = tmp_path / "agent.yaml"
    site.write_text("identity: {site: school1, room: room1}\nprivacy: {face_recognition: false}\n")
    roster = tmp_path / "roster.yaml"
    roster.write_text("class: g3\nstudents:\n- {id: s1, name: A, consent: true}\n")
    (tmp_path / "photos" / "s1").mkdir(parents=True)
    store = tmp_path / "store"
    code, _, err = _run(
        capsys,
        "roster",
        "-c",
        str(site),
        "--store",
        str(store),
        "enroll",
        "--roster",
        str(roster),
        "--photos",
        str(tmp_path / "photos"),
    )
    assert code == 1
    assert "enrolment refused: privacy.face_recognition is false" in err
    assert not store.exists()  # no key made, nothing stored

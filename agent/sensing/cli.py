"""``classroom-agent sensing analyze`` and ``classroom-agent roster ...``: for IT and checking.

``sensing analyze`` runs the service's own pipeline on still photos; ``roster`` enrols
students from photos into the encrypted store, lists and removes them. Both read the
``sensing`` section of the site file when there is one (thresholds, models), else the
defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import (
    DEFAULT_SITE_FILE,
    AgentConfig,
    ConfigSources,
    SensingConfig,
    add_config_options,
)
from agent.sensing.talk_cli import add_talk_parser

if TYPE_CHECKING:
    from agent.sensing.roster import RosterStore

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _config(args: argparse.Namespace) -> tuple[SensingConfig, AgentConfig | None]:
    if not args.config and not DEFAULT_SITE_FILE.exists():
        return SensingConfig(), None
    config = ConfigSources.from_args(args).load().config
    return config.sensing, config


def add_sensing_parsers(sub: Any) -> None:
    sensing = sub.add_parser("sensing", help="on-device sensing: check the models on photos")
    actions = sensing.add_subparsers(dest="sensing_command", required=True)
    analyze = actions.add_parser(
        "analyze", help="faces and head count in photos (the service's own pipeline)"
    )
    add_config_options(analyze)
    analyze.add_argument("images", type=Path, nargs="+", help="photos (JPEG, PNG, ...)")
    analyze.add_argument("--roster", type=Path, help="roster store to match faces against")
    analyze.add_argument("--key-file", type=Path, help="the store's key (default: from config)")
    analyze.add_argument("--json", action="store_true", help="a JSON list, one object an image")
    analyze.set_defaults(func=cmd_analyze)
    attendance = actions.add_parser(
        "attendance", help="this room's sealed attendance records (they stay on the device)"
    )
    add_config_options(attendance)
    attendance.add_argument("lesson", nargs="?", help="lesson id (default: list the records)")
    attendance.add_argument("--store", type=Path, help="store folder (default: from config)")
    attendance.add_argument("--key-file", type=Path, help="the store's key (default: config)")
    attendance.add_argument("--json", action="store_true")
    attendance.set_defaults(func=cmd_attendance)
    add_talk_parser(actions)


def read_image(path: Path) -> Any:
    """A BGR image, or ValueError saying why the file is not one."""
    import cv2
    import numpy as np

    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError("not an image (JPEG, PNG, BMP, WebP... expected)")
    return image


def cmd_analyze(args: argparse.Namespace) -> int:
    from agent.sensing.models import ModelError
    from agent.sensing.pipeline import Pipeline

    sensing, _ = _config(args)
    gallery = None
    if args.roster is not None:
        from agent.sensing.roster import RosterError, open_store

        try:
            store = open_store(args.roster, key_file=args.key_file, create=False)
            gallery = store.gallery(sensing.match_distance)
        except RosterError as exc:
            print(f"roster: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    try:
        pipeline = Pipeline(sensing, gallery=gallery, identify=gallery is not None)
    except ModelError as exc:
        print(f"model: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    results: list[dict[str, Any]] = []
    failed = False
    for path in args.images:
        try:
            image = read_image(path)
        except ValueError as exc:
            failed = True
            print(f"{path}: {exc}", file=sys.stderr)
            continue
        faces = [r.to_dict() for r in pipeline.still(image)]
        height, width = image.shape[:2]
        results.append(
            {
                "image": str(path),
                "width": width,
                "height": height,
                "faces": faces,
                "head_count": len(faces),
            }
        )
        if not args.json:
            print(f"{path}: {len(faces)} face(s), head count {len(faces)}")
            for face in faces:
                x, y, w, h = face["box"]
                who = ""
                if "student" in face:
                    who = (
                        f"  {face['student']} (distance {face['distance']:.3f})"
                        if face["student"]
                        else "  unknown"
                    )
                print(f"  box {x},{y} {w}x{h}  score {face['score']:.2f}{who}")
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_FAILURE if failed else EXIT_OK


# -- roster ---------------------------------------------------------------------------------

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SMALL_FACE_PX = 80  # an enrolment photo's face should be at least this tall
BLURRY = 40.0  # variance of the Laplacian of the 150x150 chip below this: blurry


def add_roster_parser(sub: Any) -> None:
    roster = sub.add_parser(
        "roster", help="enrol a class roster from photos; list or remove enrolled students"
    )
    add_config_options(roster)
    roster.add_argument("--store", type=Path, help="store folder (default: sensing.roster_dir)")
    roster.add_argument("--key-file", type=Path, help="the store's key (default: from config)")
    actions = roster.add_subparsers(dest="roster_command", required=True)
    enroll = actions.add_parser("enroll", help="enrol consenting students from their photos")
    enroll.add_argument(
        "--roster",
        type=Path,
        required=True,
        help="roster file (YAML), or one IT signed (profile sign --type roster)",
    )
    enroll.add_argument(
        "--photos",
        type=Path,
        required=True,
        help="folder with one sub-folder per student id (or files named ID.jpg)",
    )
    actions.add_parser("list", help="the enrolled students")
    remove = actions.add_parser("remove", help="remove a student and their embeddings")
    remove.add_argument("student", help="student id")
    roster.set_defaults(func=cmd_roster)


def add_sensing_commands(sub: Any) -> None:
    add_sensing_parsers(sub)
    add_roster_parser(sub)
    add_privacy_parser(sub)


def _store_dir(args: argparse.Namespace, config: AgentConfig | None) -> Path:
    if args.store is not None:
        return Path(args.store)
    if config is None:
        raise SystemExit("no site file: pass --store DIR (or --config FILE)")
    from agent.sensing.roster import store_directory

    return store_directory(config)


def _photos_of(folder: Path, student: str) -> list[Path]:
    found = []
    own = folder / student
    if own.is_dir():
        found = sorted(p for p in own.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    found += sorted(
        p for p in folder.glob(f"{student}.*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
    )
    return found


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(1, total)
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done == total or not sys.stderr.isatty() else ""
    print(f"\r[{bar}] {done}/{total} {label:<20}", end=end, file=sys.stderr, flush=True)


def cmd_roster(args: argparse.Namespace) -> int:
    from agent.sensing.roster import RosterError, open_store

    sensing, config = _config(args)
    directory = _store_dir(args, config)
    key_file = args.key_file or sensing.key_file
    try:
        if args.roster_command == "enroll":
            return _enroll(args, sensing, config, directory, key_file)
        store = open_store(directory, key_file=key_file)
    except RosterError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    if args.roster_command == "list":
        if not store.students:
            print("no students enrolled")
        for s in sorted(store.students.values(), key=lambda s: s.id):
            consent = "consent" if s.consent else "NO CONSENT"
            print(
                f"{s.id:<16} {s.name:<20} {s.class_name:<12} {consent:<10} "
                f"{len(s.embeddings)} photo(s)"
            )
        return EXIT_OK
    if not store.remove(args.student):
        print(f"{args.student}: not enrolled in {directory}", file=sys.stderr)
        return EXIT_FAILURE
    store.save()
    print(f"{args.student}: removed (embeddings deleted)")
    return EXIT_OK


def _enroll(
    args: argparse.Namespace,
    sensing: SensingConfig,
    config: AgentConfig | None,
    directory: Path,
    key_file: Path | None,
) -> int:
    import cv2
    import numpy as np

    from agent.sensing.models import ModelError
    from agent.sensing.pipeline import Pipeline
    from agent.sensing.roster import (
        Enrolled,
        is_signed,
        now,
        open_store,
        read_roster,
        read_signed_roster,
    )

    if config is not None and not config.privacy.face_recognition:
        print(
            "enrolment refused: privacy.face_recognition is false in the site file (this "
            "room computes and keeps no face embeddings); set it to true to enrol students",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if is_signed(args.roster):
        if config is None:
            print(
                f"{args.roster}: a signed roster needs the site file (--config): its "
                "pinned IT keys and this room's identity",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        roster = read_signed_roster(args.roster, config)
        print(f"{args.roster}: signature verified", file=sys.stderr)
    else:
        roster = read_roster(args.roster)
    if not args.photos.is_dir():
        print(f"{args.photos}: not a folder of photos", file=sys.stderr)
        return EXIT_FAILURE
    try:
        pipeline = Pipeline(sensing)
    except ModelError as exc:
        print(f"model: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    store = open_store(directory, key_file=key_file, create=True)
    known = {s.id for s in roster.students}
    for entry in sorted(args.photos.iterdir()):
        stem = entry.name if entry.is_dir() else entry.stem
        if stem not in known and (entry.is_dir() or entry.suffix.lower() in PHOTO_SUFFIXES):
            print(f"{entry}: refused: {stem!r} is not in the roster", file=sys.stderr)
    refused = 0
    report: dict[str, list[dict[str, Any]]] = {}
    embeddings: dict[str, list[Any]] = {}
    total = len(roster.students)
    for done, student in enumerate(roster.students, start=1):
        _progress(done - 1, total, student.id)
        if not student.consent:
            refused += 1
            store.remove(student.id)  # consent withdrawn: nothing of theirs is kept
            print(
                f"\n{student.id}: refused: no consent recorded (consent: false); photos not read",
                file=sys.stderr,
            )
            continue
        photos = _photos_of(args.photos, student.id)
        if not photos:
            refused += 1
            print(
                f"\n{student.id}: refused: no photos in {args.photos / student.id}/",
                file=sys.stderr,
            )
            continue
        for photo in photos:
            try:
                image = read_image(photo)
            except ValueError as exc:
                refused += 1
                print(f"\n{photo}: refused: {exc}", file=sys.stderr)
                continue
            faces = pipeline.detect(image)
            if len(faces) != 1:
                refused += 1
                why = "no face found" if not faces else f"{len(faces)} faces (one face a photo)"
                print(f"\n{photo}: refused: {why}", file=sys.stderr)
                continue
            assert pipeline.embedder is not None
            chip = pipeline.embedder.align(image, faces[0])
            sharpness = float(
                cv2.Laplacian(cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
            )
            embeddings.setdefault(student.id, []).append(pipeline.embedder.embed([chip])[0])
            report.setdefault(student.id, []).append(
                {"photo": photo.name, "face_px": round(faces[0].height), "sharpness": sharpness}
            )
        if student.id in embeddings:
            store.put(
                Enrolled(
                    student.id,
                    student.name,
                    student.class_name or roster.class_name,
                    True,
                    embeddings[student.id],
                    now(),
                )
            )
    _progress(total, total, "done")
    store.save()
    # The quality report: each photo against the student's others and the nearest other student.
    everyone = {s.id: s.embeddings for s in store.students.values() if s.embeddings}
    print(
        f"\nenrolled {len(embeddings)} of {total} students into {store.path}"
        f" ({refused} refusal(s) above)"
    )
    print(
        f"{'student':<14} {'photo':<18} {'face':>5} {'sharp':>6} {'own':>6} "
        f"{'nearest other':>20}  notes"
    )
    for student_id, rows in report.items():
        own = embeddings[student_id]
        for i, row in enumerate(rows):
            others_own = [float(np.linalg.norm(own[i] - e)) for j, e in enumerate(own) if j != i]
            nearest, nearest_id = float("inf"), "-"
            for other, items in everyone.items():
                if other == student_id:
                    continue
                for e in items:
                    d = float(np.linalg.norm(own[i] - e))
                    if d < nearest:
                        nearest, nearest_id = d, other
            notes = []
            if row["face_px"] < SMALL_FACE_PX:
                notes.append(f"small face (< {SMALL_FACE_PX} px)")
            if row["sharpness"] < BLURRY:
                notes.append("blurry")
            if others_own and max(others_own) > sensing.match_distance:
                notes.append("far from own photos")
            if nearest <= sensing.match_distance:
                notes.append(f"close to {nearest_id}: retake")
            own_text = f"{np.mean(others_own):.3f}" if others_own else "-"
            near_text = f"{nearest:.3f} {nearest_id}" if nearest_id != "-" else "-"
            print(
                f"{student_id:<14} {row['photo']:<18} {row['face_px']:>5} "
                f"{row['sharpness']:>6.0f} {own_text:>6} {near_text:>20}  {', '.join(notes)}"
            )
    return EXIT_OK if refused == 0 else EXIT_FAILURE


def cmd_attendance(args: argparse.Namespace) -> int:
    from agent.sensing.roster import RosterError, open_store

    sensing, config = _config(args)
    try:
        store = open_store(_store_dir(args, config), key_file=args.key_file or sensing.key_file)
        if args.lesson is None:
            records = [(p.stem, store.open_record(p)) for p in store.records()]
        else:
            path = store.record_path(args.lesson)
            if path is None:
                print(
                    f"{args.lesson}: no attendance record in {store.directory / 'attendance'}",
                    file=sys.stderr,
                )
                return EXIT_FAILURE
            records = [(args.lesson, store.open_record(path))]
    except RosterError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps([r for _, r in records], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not records:
        print("no attendance records")
    for name, record in records:
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in record["counts"].items())
        minutes = (record["end"] - record["start"]) / 60
        print(f"{name}: {minutes:.0f} min; {counts}; unknown faces {record['unknown']}")
        if args.lesson is None:
            continue
        for student, row in record["students"].items():
            enrolled = store.students.get(student)
            who = enrolled.name if enrolled is not None else "(no longer enrolled)"
            seen = (
                f"seen {row['first_seen_min']:.1f}-{row['last_seen_min']:.1f} min"
                if "first_seen_min" in row
                else "not seen"
            )
            print(
                f"  {student:<14} {who:<20} {row['status']:<10} {seen:<22} "
                f"confidence {row['confidence']:.2f}"
            )
    return EXIT_OK


# -- privacy --------------------------------------------------------------------------------


def _date(text: str) -> datetime.date:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: YYYY-MM-DD, e.g. 2025-09-01"
        ) from None


def add_privacy_parser(sub: Any) -> None:
    privacy = sub.add_parser(
        "privacy", help="a student's rights and retention: purge or export what is held"
    )
    actions = privacy.add_subparsers(dest="privacy_command", required=True)
    purge = actions.add_parser(
        "purge", help="erase a student everywhere, or the records of lessons before a date"
    )
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--student", help="student id: roster entry, embeddings and every record entry"
    )
    which.add_argument(
        "--before",
        type=_date,
        metavar="YYYY-MM-DD",
        help="delete the records of lessons that ended before this day (local time)",
    )
    purge.set_defaults(func=cmd_privacy_purge)
    export = actions.add_parser("export", help="everything held about a student, as JSON")
    export.add_argument("--student", required=True, help="student id")
    export.add_argument("--out", type=Path, help="write to this new file (default: stdout)")
    export.set_defaults(func=cmd_privacy_export)
    for parser in (purge, export):
        add_config_options(parser)
        parser.add_argument("--store", type=Path, help="store folder (default: from config)")
        parser.add_argument("--key-file", type=Path, help="the store's key (default: config)")


def _open_store(args: argparse.Namespace) -> RosterStore:
    """The store named by --store/--key-file or the config, as ``sensing attendance``."""
    from agent.sensing.roster import open_store

    sensing, config = _config(args)
    return open_store(_store_dir(args, config), key_file=args.key_file or sensing.key_file)


def cmd_privacy_purge(args: argparse.Namespace) -> int:
    from agent.sensing.privacy import purge_before, purge_student
    from agent.sensing.roster import RosterError

    try:
        store = _open_store(args)
        if args.before is not None:
            cutoff = datetime.datetime.combine(args.before, datetime.time()).timestamp()
            report = purge_before(store, cutoff)
        else:
            report = purge_student(store, args.student)
    except RosterError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a full or read-only disk: what was done so far stays done
        print(f"{exc.filename}: cannot write ({exc.strerror})", file=sys.stderr)
        return EXIT_FAILURE
    resealed = sum(len(v) for v in report.resealed.values())
    if args.before is not None:
        deleted = ", ".join(f"{kind} {len(v)}" for kind, v in sorted(report.deleted.items()))
        total = sum(len(v) for v in report.deleted.values())
        print(
            f"deleted {total} record(s) of lessons that ended before {args.before}"
            + (f" ({deleted})" if deleted else "")
        )
        return EXIT_OK
    if not report.found and not report.unreadable:
        print(
            f"{args.student}: unknown student: not enrolled and in no record in "
            f"{store.directory}; nothing purged",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    enrolled = (
        f"roster entry and {report.embeddings} embedding(s)"
        if report.roster_entries
        else "not enrolled"
    )
    print(
        f"{args.student}: purged: {enrolled}; {report.attendance_entries} attendance row(s) "
        f"and {report.report_entries} report entry(ies) removed, {resealed} record(s) "
        "sealed again"
    )
    return _unsearched(report.unreadable)


def cmd_privacy_export(args: argparse.Namespace) -> int:
    from agent.sensing.privacy import export_student, holds_student
    from agent.sensing.roster import RosterError

    try:
        store = _open_store(args)
        export = export_student(store, args.student)
    except RosterError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    if not holds_student(export) and not export["unreadable"]:
        print(
            f"{args.student}: unknown student: not enrolled and in no record in {store.directory}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    text = json.dumps(export, indent=2, ensure_ascii=False) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        refused = write_new_private(args.out, text)
        if refused is not None:
            print(refused, file=sys.stderr)
            return EXIT_FAILURE
        print(f"{args.student}: exported to {args.out}", file=sys.stderr)
    return _unsearched(export["unreadable"])


def write_new_private(path: Path, text: str) -> str | None:
    """Write personal data to a new 0600 file, never over an existing one; the refusal
    (what to do about it) or None when written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return f"{path}: exists; refusing to overwrite (name a new file)"
    except OSError as exc:
        return f"{path}: cannot write ({exc.strerror})"
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return None


def _unsearched(unreadable: list[str]) -> int:
    """Say which records the key could not open (so they were not searched): exit 1."""
    if not unreadable:
        return EXIT_OK
    print(
        f"{len(unreadable)} record(s) could not be opened with this key, so were not "
        f"searched: {', '.join(unreadable)}",
        file=sys.stderr,
    )
    return EXIT_FAILURE

"""``classroom-agent report``: the room's lesson reports, listed, shown as JSON, or saved
as an HTML page (the panel serves the same page after the lesson)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from agent.config import add_config_options
from agent.locales import Language
from agent.sensing.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    _config,
    _store_dir,
    write_new_private,
)
from agent.sensing.report import render_html
from agent.sensing.reports import open_reports, report_rows, roster_names
from agent.sensing.roster import RosterError, RosterStore


def add_report_parser(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="lesson reports (head-up rate, head count, S-T, attendance)"
    )
    add_config_options(report)
    report.add_argument("lesson", help="a lesson id, or 'list' for every report on the device")
    output = report.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the report's data as JSON")
    output.add_argument("--html", type=Path, metavar="FILE", help="write the page to FILE")
    report.add_argument(
        "--language",
        choices=("zh-CN", "en"),
        help="the page's language (default: ui.language, Chinese when that is 'auto')",
    )
    report.add_argument("--store", type=Path, help="store folder (default: from config)")
    report.add_argument("--key-file", type=Path, help="the store's key (default: config)")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    sensing, config = _config(args)
    try:
        store = open_reports(_store_dir(args, config), args.key_file or sensing.key_file)
        if args.lesson == "list":
            return _list(store, json_out=args.json)
        path = store.record_path(args.lesson, "report")
        if path is None:
            print(
                f"{args.lesson}: no report in {store.directory / 'report'} "
                "(classroom-agent report list shows the lessons)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        report = store.open_record(path)
    except RosterError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_OK
    language: Language = args.language or (
        config.ui.language if config is not None and config.ui.language != "auto" else "zh-CN"
    )
    page = render_html(report, roster_names(store), language)
    if args.html is None:
        print(page)
        return EXIT_OK
    refused = write_new_private(args.html, page)  # names and attendance: 0600
    if refused is not None:
        print(f"{refused} (--html)", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.html}")
    return EXIT_OK


def _list(store: RosterStore, *, json_out: bool) -> int:
    def unreadable(path: Path, exc: Exception) -> None:
        print(f"{path.name}: {exc}", file=sys.stderr)

    rows = report_rows(store, unreadable)  # newest first; attendance counts as corrected
    if json_out:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no lesson reports")
    for row in rows:
        start = datetime.datetime.fromtimestamp(row["start"])
        up = "-" if row["head_up_rate"] is None else f"{100 * row['head_up_rate']:.0f}%"
        print(
            f"{row['lesson']:<40} {start:%Y-%m-%d %H:%M} {row['minutes']:>5.0f} min  "
            f"heads {row['head_count']:>3}  head-up {up:>4}  mode {row['mode'] or '-':<8} "
            f"present {row['present']} late {row['late']} absent {row['absent']}"
        )
    return EXIT_OK

"""The lesson report: what teaching researchers read after class, built on the device.

At a lesson's end the sensing service seals a *report record* (the store's ``report``
folder, AES-GCM like attendance): the per-minute curves (head count, head-up rate, hand
raises), the S-T samples and figures, the attendance rows by pseudonymous student id,
and the teacher's corrections. Names are not in it: they come from the roster when the
report is shown, so removing a student from the roster removes their name everywhere.

The page is HTML with its charts drawn as SVG here, in Python: nothing to fetch, no
script to run (the panel's CSP allows none inline), it prints, and a saved file opens
anywhere. A chart library (ECharts, 1 MB of JavaScript) would add interaction nobody
needs on a one-page report. Texts come from the pages' catalogues (``report.*`` keys),
in the room's ``ui.language``.
"""

from __future__ import annotations

import datetime
import html
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from agent.locales import FALLBACK, Language, catalogue
from agent.sensing.st_analysis import StResult

REPORT_VERSION = 1
STATUS_KEYS = {
    "present": "report.status.present",
    "late": "report.status.late",
    "left_early": "report.status.left_early",
    "absent": "report.status.absent",
}
MODE_KEYS = {
    "practice": "report.mode.practice",
    "lecture": "report.mode.lecture",
    "dialogue": "report.mode.dialogue",
    "mixed": "report.mode.mixed",
}
ROLE_KEYS = {"main": "report.role.main", "receiving": "report.role.receiving"}
# What a teacher may set a student to on the panel (issue: present / absent / late);
# "left early" is only ever measured.
Correctable = Literal["present", "late", "absent"]
CORRECTABLE: tuple[Correctable, ...] = ("present", "late", "absent")
Css = Literal["inline"] | str  # "inline", or the URL of report.css (the panel serves it)
CSS = """
body{font-family:"Noto Sans CJK SC","Noto Sans",sans-serif;margin:24px;color:#1d2733;
background:#fff;max-width:1100px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}
.meta{color:#556;margin-bottom:16px}.grid{display:flex;flex-wrap:wrap;gap:16px}
.card{border:1px solid #d5dde6;border-radius:8px;padding:12px;flex:1 1 480px}
.card h2{margin:0 0 8px}
.figures{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.figure{background:#f2f6fa;border-radius:8px;padding:10px 16px;min-width:120px}
.figure b{display:block;font-size:22px}.figure span{color:#556;font-size:13px}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #e3e8ee;
padding:6px 8px;text-align:left;font-size:14px}th{background:#f2f6fa}
.corrected{color:#b45309;font-weight:600}.was{color:#667}
.none{color:#889;font-style:italic}svg{width:100%;height:auto;max-height:300px}
@media print{.card{break-inside:avoid}}
"""


def report_record(
    attendance: dict[str, Any],
    summary: dict[str, Any],
    st: StResult | None,
    *,
    room: str,
    role: str,
    hands: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The sealed report of one lesson, from the attendance record and the talk result.

    ``hands`` is None where hand raising is not measured (the report says so rather than
    drawing a flat line that would read as "nobody raised a hand").
    """
    return {
        "v": REPORT_VERSION,
        "lesson": attendance["lesson"],
        "room": room,
        "role": role,
        "start": attendance["start"],
        "end": attendance["end"],
        "minutes": attendance.get("minutes", []),
        "summary": summary,
        "hands": hands,
        "st": None if st is None else st.to_dict(),
        "attendance": {
            "students": attendance["students"],
            "counts": attendance["counts"],
            "unknown": attendance["unknown"],
        },
        "corrections": [],
    }


class CorrectionRefused(ValueError):
    """A correction that does not fit the report; the text names the field and the fix."""


def add_correction(
    report: dict[str, Any],
    student: str,
    status: str,
    *,
    at: float,
    by: str,
    source: str,
) -> dict[str, Any]:
    """``report`` with the teacher's correction of ``student`` to ``status`` appended.

    The entry keeps when (``at``), how the request was let in (``by``: "loopback" or
    "panel-token") and from which address (``from``), and ``was``: what the report showed
    for the student before (the measured status, or an earlier correction). The measured
    attendance itself never changes."""
    students = report["attendance"]["students"]
    if student not in students:
        raise CorrectionRefused(
            f"student: {student} is not in lesson {report['lesson']}'s attendance "
            "(pick one of the report's rows)"
        )
    if status not in CORRECTABLE:
        raise CorrectionRefused(f"status: {status!r} is not one of {', '.join(CORRECTABLE)}")
    was, _ = effective_status(report, student)
    entry = {"student": student, "status": status, "was": was, "at": at, "by": by, "from": source}
    return {**report, "corrections": [*report.get("corrections", []), entry]}


def corrected_counts(report: dict[str, Any]) -> dict[str, int]:
    """Students per status, the teacher's corrections applied."""
    counts = dict.fromkeys(STATUS_KEYS, 0)
    for student in report["attendance"]["students"]:
        status, _ = effective_status(report, student)
        counts[status] = counts.get(status, 0) + 1
    return counts


def attendance_aggregate(report: dict[str, Any]) -> dict[str, Any]:
    """The body of the lesson's ``attendance`` message on the sensing topic (contract
    ``SensingAttendance``), from its report: counts and rates only, the teacher's
    corrections applied and counted. The same at the lesson's end and after a correction,
    so the fleet's figures follow the teacher's."""
    summary = report.get("summary", {})
    return {
        "kind": "attendance",
        **corrected_counts(report),
        "unknown": report["attendance"]["unknown"],
        "enrolled": len(report["attendance"]["students"]),
        "head_count": summary.get("head_count", 0),
        "head_count_max": summary.get("head_count_max", 0),
        "head_up_rate": summary.get("head_up_rate"),
        "hand_raises": summary.get("hand_raises"),
        "corrections": len(report.get("corrections", [])),
    }


def report_row(report: dict[str, Any]) -> dict[str, Any]:
    """One line of a list of reports: when, where, the figures and the attendance counts
    (corrected). No student appears in it."""
    st = report.get("st") or {}
    summary = report.get("summary", {})
    return {
        "lesson": report["lesson"],
        "room": report.get("room"),
        "role": report.get("role"),
        "start": report["start"],
        "end": report["end"],
        "minutes": round((report["end"] - report["start"]) / 60, 1),
        "head_count": summary.get("head_count"),
        "head_up_rate": summary.get("head_up_rate"),
        "mode": st.get("mode"),
        "corrections": len(report.get("corrections", [])),
        **corrected_counts(report),
    }


def effective_status(report: dict[str, Any], student: str) -> tuple[str, str | None]:
    """(status now, status as measured when the teacher corrected it, else None)."""
    measured = str(report["attendance"]["students"][student]["status"])
    latest = None
    for correction in report.get("corrections", []):
        if correction.get("student") == student:
            latest = str(correction["status"])
    if latest is None or latest == measured:
        return measured, None
    return latest, measured


# -- the page -----------------------------------------------------------------------------


def render_html(
    report: dict[str, Any],
    names: dict[str, str],
    language: Language,
    *,
    css: Css = "inline",
    timezone: datetime.tzinfo | None = None,
) -> str:
    """The report as one HTML page with SVG charts, in ``language``."""
    text = _texts(language)
    esc = html.escape
    start = datetime.datetime.fromtimestamp(report["start"], timezone)
    minutes = max(0.0, (report["end"] - report["start"]) / 60)
    summary = report.get("summary", {})
    st = report.get("st")
    counts = corrected_counts(report)
    figures = [
        (f"{minutes:.0f}", text("report.fig.minutes")),
        (str(summary.get("head_count", 0)), text("report.fig.head_count")),
        (_percent(summary.get("head_up_rate")), text("report.fig.head_up")),
        (
            "—" if report.get("hands") is None else str(sum(h["count"] for h in report["hands"])),
            text("report.fig.hands"),
        ),
        ("—" if st is None else f"{st['rt']:.2f}", "Rt"),
        ("—" if st is None else f"{st['ch']:.2f}", "Ch"),
        ("—" if st is None else text(MODE_KEYS[st["mode"]]), text("report.fig.mode")),
        (
            f"{counts['present'] + counts['late'] + counts['left_early']} / {sum(counts.values())}",
            text("report.fig.attended"),
        ),
    ]
    head = (
        f"<style>{CSS}</style>"
        if css == "inline"
        else f'<link rel="stylesheet" href="{esc(css, quote=True)}">'
    )
    parts = [
        "<!doctype html>",
        f'<html lang="{esc(language)}"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(text('report.title'))} {esc(report['lesson'])}</title>{head}</head><body>",
        f"<h1>{esc(text('report.title'))}</h1>",
        f'<div class="meta">{esc(report["lesson"])} · {esc(report["room"])} · '
        f"{esc(text(ROLE_KEYS.get(report['role'], 'report.role.receiving')))}"
        f" · {start:%Y-%m-%d %H:%M} · {minutes:.0f} {esc(text('report.unit.min'))}</div>",
        '<div class="figures">',
        *(
            f'<div class="figure"><b>{esc(value)}</b><span>{esc(label)}</span></div>'
            for value, label in figures
        ),
        '</div><div class="grid">',
        _card(text("report.chart.head_up"), _head_up_chart(report, text)),
        _card(text("report.chart.head_count"), _head_count_chart(report, text)),
        _card(text("report.chart.hands"), _hands_chart(report, text)),
        _card(text("report.chart.st"), _st_chart(st, text)),
        _card(text("report.chart.rt_ch"), _rt_ch_chart(st, text)),
        "</div>",
        f"<h2>{esc(text('report.attendance'))}</h2>",
        _attendance_table(report, names, text, timezone),
        f'<p class="meta">{esc(text("report.note"))}</p>',
        "</body></html>",
    ]
    return "\n".join(parts)


def _texts(language: Language) -> Callable[[str], str]:
    messages, fallback = catalogue(language), catalogue(FALLBACK)

    def text(key: str) -> str:
        return messages.get(key) or fallback.get(key) or key

    return text


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _card(title: str, body: str) -> str:
    return f'<div class="card"><h2>{html.escape(title)}</h2>{body}</div>'


def _attendance_table(
    report: dict[str, Any],
    names: dict[str, str],
    text: Callable[[str], str],
    timezone: datetime.tzinfo | None,
) -> str:
    esc = html.escape
    latest = {c.get("student"): c for c in report.get("corrections", [])}
    rows = []
    for student, row in sorted(report["attendance"]["students"].items()):
        status, measured = effective_status(report, student)
        shown = esc(text(STATUS_KEYS[status]))
        if measured is not None:
            correction = latest[student]
            when = datetime.datetime.fromtimestamp(float(correction.get("at", 0)), timezone)
            note = text("report.corrected").format(
                time=f"{when:%Y-%m-%d %H:%M}", source=correction.get("from", "?")
            )
            shown = (
                f'<span class="corrected" title="{esc(note, quote=True)}">{shown}</span> '
                # Said in words: a line through Chinese characters is hard to see.
                f'<span class="was">'
                f"{esc(text('report.measured').format(status=text(STATUS_KEYS[measured])))}"
                "</span>"
            )
        seen = (
            f"{row['first_seen_min']:.0f}-{row['last_seen_min']:.0f}"
            if "first_seen_min" in row
            else "—"
        )
        name = names.get(student)
        who = esc(name) if name else f'<span class="none">{esc(text("report.unnamed"))}</span>'
        rows.append(
            f'<tr data-student="{esc(student, quote=True)}"><td>{esc(student)}</td><td>{who}</td>'
            f"<td>{shown}</td><td>{row['confidence']:.2f}</td><td>{esc(seen)}</td></tr>"
        )
    if not rows:
        return f'<p class="none">{esc(text("report.no_roster"))}</p>' + _unknown_line(report, text)
    header = "".join(
        f"<th>{esc(text(k))}</th>"
        for k in (
            "report.col.student",
            "report.col.name",
            "report.col.status",
            "report.col.confidence",
            "report.col.seen",
        )
    )
    return (
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + _unknown_line(report, text)
    )


def _unknown_line(report: dict[str, Any], text: Callable[[str], str]) -> str:
    unknown = report["attendance"]["unknown"]
    # The colon is the language's own (Chinese takes a full-width one).
    line = html.escape(text("report.unknown")).replace("{n}", f"<b>{int(unknown)}</b>")
    return f"<p>{line}</p>"


# -- charts (SVG) -------------------------------------------------------------------------

WIDTH, HEIGHT = 520, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 30
AXIS = "#8a96a3"
INK = "#1f6feb"


def _frame(x_max: float, y_max: float, y_label: Callable[[float], str], x_title: str) -> list[str]:
    """Axes, grid and tick labels for a plot of 0..x_max by 0..y_max."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = []
    for i in range(5):
        y = TOP + plot_h * (1 - i / 4)
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#e3e8ee"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="{AXIS}">{html.escape(y_label(y_max * i / 4))}</text>'
        )
    step = _nice_step(x_max)
    tick = 0.0
    while tick <= x_max + 1e-9:
        x = LEFT + plot_w * (tick / x_max if x_max else 0)
        out.append(
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="11" text-anchor="middle" '
            f'fill="{AXIS}">{tick:g}</text>'
        )
        tick += step
    out.append(
        f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" '
        f'stroke="{AXIS}"/><text x="{WIDTH - RIGHT}" y="{HEIGHT - 2}" font-size="11" '
        f'text-anchor="end" fill="{AXIS}">{html.escape(x_title)}</text>'
    )
    return out


def _nice_step(span: float) -> float:
    if span <= 0:
        return 1.0
    raw = span / 6
    power = 10.0 ** math.floor(math.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def _svg(parts: Sequence[str], label: str) -> str:
    return (
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def _empty(text: Callable[[str], str], key: str) -> str:
    return f'<p class="none">{html.escape(text(key))}</p>'


def _series(report: dict[str, Any], field: str) -> list[tuple[float, float]]:
    """(minutes since the start, value) for each minute row that has the value."""
    out = []
    for row in report.get("minutes", []):
        value = row.get(field)
        if value is None or not row.get("samples"):
            continue
        out.append(((row["minute_start"] - report["start"]) / 60, float(value)))
    return out


def _line(  # noqa: PLR0917 (a plot's six settings, each named at the call)
    points: list[tuple[float, float]],
    x_max: float,
    y_max: float,
    y_label: Callable[[float], str],
    x_title: str,
    label: str,
) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    coords = [
        (LEFT + plot_w * x / x_max, TOP + plot_h * (1 - min(y, y_max) / y_max)) for x, y in points
    ]
    path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(coords))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{INK}"/>' for x, y in coords)
    parts = _frame(x_max, y_max, y_label, x_title)
    parts.append(f'<path d="{path}" fill="none" stroke="{INK}" stroke-width="2"/>{dots}')
    return _svg(parts, label)


def _x_max(report: dict[str, Any]) -> float:
    return max(1.0, (float(report["end"]) - float(report["start"])) / 60)


def _head_up_chart(report: dict[str, Any], text: Callable[[str], str]) -> str:
    points = _series(report, "head_up_rate")
    if not points:
        return _empty(text, "report.no_data")
    return _line(
        points,
        _x_max(report),
        1.0,
        lambda v: f"{100 * v:.0f}%",
        text("report.unit.min"),
        text("report.chart.head_up"),
    )


def _head_count_chart(report: dict[str, Any], text: Callable[[str], str]) -> str:
    points = _series(report, "head_count")
    if not points:
        return _empty(text, "report.no_data")
    top = max(4.0, math.ceil(max(y for _, y in points) / 4) * 4)
    return _line(
        points,
        _x_max(report),
        top,
        lambda v: f"{v:.0f}",
        text("report.unit.min"),
        text("report.chart.head_count"),
    )


def _hands_chart(report: dict[str, Any], text: Callable[[str], str]) -> str:
    hands = report.get("hands")
    if hands is None:
        return _empty(text, "report.hands_off")
    x_max = _x_max(report)
    top = max(4.0, math.ceil(max((h["count"] for h in hands), default=0) / 4) * 4)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = _frame(x_max, top, lambda v: f"{v:.0f}", text("report.unit.min"))
    bar_w = max(2.0, plot_w / x_max * 0.7)
    for hand in hands:
        x = LEFT + plot_w * hand["minute"] / x_max
        h = plot_h * hand["count"] / top
        parts.append(
            f'<rect x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{INK}"/>'
        )
    return _svg(parts, text("report.chart.hands"))


def _st_chart(st: dict[str, Any] | None, text: Callable[[str], str]) -> str:
    """The S-T curve: one step right for each T sample, one step up for each S."""
    if st is None or not st.get("samples"):
        return _empty(text, "report.st_off")
    samples = str(st["samples"])
    n = len(samples)
    size = HEIGHT - TOP - BOTTOM
    left = LEFT + (WIDTH - LEFT - RIGHT - size) / 2
    x = y = 0
    path = [f"M{left:.1f},{TOP + size:.1f}"]
    for sample in samples:
        if sample == "T":
            x += 1
        else:
            y += 1
        path.append(f"L{left + size * x / n:.1f},{TOP + size * (1 - y / n):.1f}")
    parts = [
        f'<rect x="{left:.1f}" y="{TOP}" width="{size}" height="{size}" fill="none" '
        f'stroke="{AXIS}"/>',
        f'<line x1="{left:.1f}" y1="{TOP + size}" x2="{left + size:.1f}" y2="{TOP}" '
        f'stroke="#e3e8ee" stroke-dasharray="4 4"/>',
        f'<path d="{" ".join(path)}" fill="none" stroke="{INK}" stroke-width="2"/>',
        f'<text x="{left + size:.1f}" y="{HEIGHT - 8}" font-size="12" text-anchor="end" '
        f'fill="{AXIS}">T ({html.escape(text("report.axis.t"))})</text>',
        f'<text x="{left - 6:.1f}" y="{TOP + 10}" font-size="12" text-anchor="end" '
        f'fill="{AXIS}">S</text>',
        f'<text x="{left - 6:.1f}" y="{TOP + 24}" font-size="11" text-anchor="end" '
        f'fill="{AXIS}">{html.escape(text("report.axis.s"))}</text>',
    ]
    return _svg(parts, text("report.chart.st"))


def _rt_ch_chart(st: dict[str, Any] | None, text: Callable[[str], str]) -> str:
    """Rt across, Ch up, the four modes' regions (Rt <= 0.3 practice, >= 0.7 lecture,
    between: dialogue where Ch >= 0.4, else mixed) and the lesson's point."""
    if st is None or not st.get("samples"):
        return _empty(text, "report.st_off")
    size = HEIGHT - TOP - BOTTOM
    left = LEFT + (WIDTH - LEFT - RIGHT - size) / 2

    def at(rt: float, ch: float) -> tuple[float, float]:
        return left + size * rt, TOP + size * (1 - ch)

    regions = [
        ((0.0, 0.0, 0.3, 1.0), "#e7f0fd", "report.mode.practice"),
        ((0.7, 0.0, 1.0, 1.0), "#fdf0e7", "report.mode.lecture"),
        ((0.3, 0.4, 0.7, 1.0), "#e9f7ef", "report.mode.dialogue"),
        ((0.3, 0.0, 0.7, 0.4), "#f4f0fa", "report.mode.mixed"),
    ]
    parts = []
    for (x0, y0, x1, y1), colour, key in regions:
        (ax, ay), (bx, by) = at(x0, y1), at(x1, y0)
        parts.append(
            f'<rect x="{ax:.1f}" y="{ay:.1f}" width="{bx - ax:.1f}" height="{by - ay:.1f}" '
            f'fill="{colour}" stroke="#c9d3de"/>'
            f'<text x="{(ax + bx) / 2:.1f}" y="{(ay + by) / 2:.1f}" font-size="11" '
            f'text-anchor="middle" fill="#556">{html.escape(text(key))}</text>'
        )
    px, py = at(min(1.0, st["rt"]), min(1.0, st["ch"]))
    parts += [
        f'<circle cx="{px:.1f}" cy="{py:.1f}" r="6" fill="#d9480f" stroke="#fff" '
        f'stroke-width="2"/>',
        # Beside the axis's end, clear of its "1".
        f'<text x="{left + size + 8:.1f}" y="{TOP + size + 4}" font-size="12" '
        f'fill="{AXIS}">Rt</text>',
        f'<text x="{left - 6:.1f}" y="{TOP + 10}" font-size="12" text-anchor="end" '
        f'fill="{AXIS}">Ch</text>',
        *(
            f'<text x="{at(v, 0)[0]:.1f}" y="{TOP + size + 14}" font-size="10" '
            f'text-anchor="middle" fill="{AXIS}">{v:g}</text>'
            for v in (0, 0.3, 0.7, 1)
        ),
        f'<text x="{left - 4:.1f}" y="{at(0, 0.4)[1] + 4:.1f}" font-size="10" '
        f'text-anchor="end" fill="{AXIS}">0.4</text>',
    ]
    return _svg(parts, text("report.chart.rt_ch"))

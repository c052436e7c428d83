"""The README's demo: agents come online on the embedded broker with live capture stats,
hold a lesson, and the sensing room's lesson ends with its report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.locales import catalogue
from agent.testkit.acoustics import espeak_available

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_brings_rooms_online_and_stops_them_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "demo",
            "--rooms",
            "2",
            "--duration",
            "24",  # a lesson of about 20 s: 6-7 S-T samples at the demo's 3 s
            "--workdir",
            str(tmp_path),
            "--dashboard-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    final = result.stdout.split("Classroom Edge Agent demo")[-1]
    rows = [
        line.split()
        for line in final.splitlines()
        if len(line.split()) > 2 and line.split()[1] in ("main", "receiving")
    ]
    assert [row[0] for row in rows] == ["central-school.room-101", "village-a.room-1"]
    for row in rows:
        assert row[2] == "online"  # STATE
        assert row[4] == "ok"  # CAMERA
        assert float(row[5]) > 5  # measured fps
    # The button was pressed: the receiving room joined, decoded stamped video, and
    # went back to waiting when the lesson ended.
    assert rows[0][9:11] == ["live", "1/1"], rows[0]  # LESSON: main room, rooms live
    assert rows[1][9] == "live", rows[1]
    assert float(rows[1][10]) < 1000  # glass-to-glass median, ms
    assert re.search(r"village-a\.room-1: live \d+\.\d+ s after the button", result.stdout)
    # The panels: the teacher's, the receiving room's kiosk, the watch page with its token.
    assert re.search(
        r"teacher panel of central-school\.room-101: http://127\.0\.0\.1:\d+/", result.stdout
    )
    assert re.search(r"kiosk of village-a\.room-1: http://127\.0\.0\.1:\d+/", result.stdout)
    assert re.search(
        r"watch page of central-school\.room-101: \S+/watch#token=\S{16,}", result.stdout
    )
    assert "lesson ended: receiving rooms back to 'waiting'" in result.stdout
    # The sensing room (village-a): a video of 6 enrolled students, 1 visitor and a man
    # standing at the side (neither enrolled), 1 enrolled student absent; counts only,
    # from its sensing topic at the lesson's end.
    assert (
        "village-a.room-1 attendance: present 6, late 0, left early 0, absent 1 of 7 "
        "enrolled; 2 unknown face(s)" in result.stdout
    ), result.stdout
    # The lesson's figures and its report, written by `classroom-agent report --html` in
    # the room's language (zh-CN, the demo's default).
    figures = re.search(
        r"village-a\.room-1 lesson figures: head-up rate (\d+)%, hand raises (\d+) \(the "
        r"video's: 1 every 12 s\)(?:, S-T ([TS]+): Rt [\d.]+, Ch [\d.]+, "
        r"(practice|lecture|dialogue|mixed) \(the script's: dialogue\))?",
        result.stdout,
    )
    assert figures is not None, result.stdout
    assert 0 <= int(figures[1]) <= 100
    # The man raises his hands for 3 s every 12 s: a lesson of about 20 s holds one such
    # stretch whole, or two; never three.
    hands = int(figures[2])
    assert 1 <= hands <= 2, result.stdout
    if espeak_available():
        samples = figures[3]
        # The remote teacher on the loudspeaker is T, the pupils answering are S.
        assert samples is not None, result.stdout
        assert len(samples) >= 4
        assert set(samples) == {"T", "S"}, samples
    written = re.search(r"village-a\.room-1 lesson report \(zh-CN\): (\S+\.html)", result.stdout)
    assert written is not None, result.stdout
    report = Path(written[1])
    assert report.parent == tmp_path
    assert report.stat().st_mode & 0o777 == 0o600  # names and attendance
    page = report.read_text(encoding="utf-8")
    zh = catalogue("zh-CN")
    assert '<html lang="zh-CN">' in page
    assert f"<h1>{zh['report.title']}</h1>" in page
    charts = ["report.chart.head_up", "report.chart.head_count", "report.chart.hands"]
    if espeak_available():
        charts += ["report.chart.st", "report.chart.rt_ch"]
    for key in charts:
        assert f'<svg viewBox="0 0 520 220" role="img" aria-label="{zh[key]}"' in page, key
    assert zh["report.hands_off"] not in page  # measured, and drawn above
    assert f'<div class="figure"><b>{hands}</b><span>{zh["report.fig.hands"]}</span>' in page
    assert "demo-s07" in page  # the absent student, by the roster
    assert result.stdout.count("exit code 0") == 2
    assert re.search(r"maintenance dashboard: http://127\.0\.0\.1:\d+/", result.stdout)
    assert (tmp_path / "logs" / "village-a.room-1.log").exists()


def test_demo_refuses_a_bad_room_count() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--rooms", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "--rooms: must be between 1 and 8, got 0" in result.stderr

"""Head pose and the head-up rate, the lesson report (record, page, command), and a
sensing service whose model fails on every frame.

Head pose is checked on real photos turned by a known yaw and pitch
(:mod:`agent.testkit.poses`: a generic face surface, honestly synthetic): the estimate's
change from the unturned photo is compared with the turn applied.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import SensingConfig
from agent.sensing import Attendance, Detector, Face, Pipeline, RetinaFaceDetector, model_info
from agent.sensing.headpose import HeadPose, camera_matrix, head_pose
from agent.sensing.report import render_html
from agent.sensing.roster import Enrolled, open_store
from agent.sensing.service import MAX_FAILURES, SensingService
from agent.testkit import cut_faces
from agent.testkit.poses import turn_face
from tests.sensing_data import GROUP_PHOTOS, OBAMA, lesson_report, lessonless_service, track

TURNS = [(-30, 0), (-15, 0), (15, 0), (30, 0), (0, -20), (0, 20), (0, 35)]


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)


def _pose(detector: Detector, image: Any) -> HeadPose | None:
    faces = detector.detect(image)
    if not faces:
        return None
    face = max(faces, key=lambda f: f.height)
    return head_pose(face.landmarks, camera_matrix(image.shape[1], image.shape[0]))


def test_head_pose_follows_known_turns_of_real_faces(detector: RetinaFaceDetector) -> None:
    crops = cut_faces([*GROUP_PHOTOS[:4], OBAMA[0]], detector, margin=0.8)
    assert len(crops) >= 10
    errors: list[tuple[int, int, float, float]] = []
    for crop in crops:
        base = _pose(detector, crop.image)
        if base is None or abs(base.yaw) > 25:  # a face already turned far: not a start
            continue
        faces = detector.detect(crop.image)
        landmarks = max(faces, key=lambda f: f.height).landmarks
        for yaw, pitch in TURNS:
            turned = _pose(detector, turn_face(crop.image, landmarks, yaw, pitch))
            assert turned is not None, f"{crop.source}: no face after turning {yaw}, {pitch}"
            errors.append((yaw, pitch, turned.yaw - base.yaw, turned.pitch - base.pitch))
    assert len(errors) >= 50
    yaw_error = statistics.fmean(abs(dy - y) for y, p, dy, _ in errors if p == 0)
    pitch_error = statistics.fmean(abs(dp - p) for y, p, _, dp in errors if y == 0)
    print(f"\nhead pose on turned photos: yaw MAE {yaw_error:.1f}, pitch MAE {pitch_error:.1f} deg")
    assert yaw_error < 12
    assert pitch_error < 14
    # The direction is right nearly always where it matters: a clear turn.
    assert statistics.fmean((dy > 0) == (y > 0) for y, p, dy, _ in errors if abs(y) == 30) >= 0.9
    down = [dp for y, p, _, dp in errors if (y, p) == (0, 35)]
    up = [dp for y, p, _, dp in errors if (y, p) == (0, -20)]
    assert statistics.fmean(down) > statistics.fmean(up) + 20


def test_the_head_up_band_is_the_rooms() -> None:
    config = SensingConfig()
    assert HeadPose(0, 0).is_up(config)
    assert HeadPose(30, 15).is_up(config)
    assert not HeadPose(60, 0).is_up(config)  # turned to a neighbour
    assert not HeadPose(0, 40).is_up(config)  # bent over the desk
    high_camera = SensingConfig(head_up_max_down_deg=45)
    assert HeadPose(0, 40).is_up(high_camera)


def test_the_head_up_rate_counts_faces_the_detector_lost_as_heads_down() -> None:
    config = SensingConfig(head_count_window_s=10)
    attendance = Attendance(config, "lesson-1", 0.0, set())
    tracks = [track(i) for i in range(4)]
    attendance.observe(1.0, tracks, heads_up=4)
    attendance.observe(2.0, tracks[:2], heads_up=2)  # two bent down: no face seen
    minute = attendance.take_minute(60.0)
    assert minute["head_count"] == 4
    assert minute["head_up_rate"] == pytest.approx((1.0 + 0.5) / 2)
    attendance.observe(61.0, tracks, heads_up=None)  # no pose for this sample
    attendance.take_minute(120.0)
    summary = attendance.summary()
    assert summary == {
        "head_count": 4,
        "head_count_max": 4,
        "head_up_rate": 0.75,
        "hand_raises": None,  # not measured: not zero
    }
    assert attendance.finish(120.0)["minutes"][0]["head_up_rate"] == 0.75


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svgs = 0
        self.shapes = 0
        self.text: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.svgs += tag == "svg"
        self.shapes += tag in {"path", "rect", "circle"}
        self.links += [v or "" for k, v in attrs if k in {"src", "href"}]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_the_report_page_draws_every_chart_in_the_rooms_language(language: str) -> None:
    report = lesson_report(corrected=True)
    page = _Page()
    page.feed(render_html(report, {"s-a": "王小明", "s-b": "Ben"}, language))  # type: ignore[arg-type]
    text = "".join(page.text)
    assert page.svgs == 5  # head-up, head count, hands, S-T, Rt-Ch
    assert page.shapes > 40
    assert page.links == []  # nothing fetched, inline CSS
    assert "王小明" in text
    words = {"zh-CN": ("课堂报告", "抬头率", "讲授型", "迟到"), "en": ("Lesson report", "lecture")}
    for word in words[language]:
        assert word in text, word
    assert ("缺勤" if language == "zh-CN" else "absent") in text  # s-c as measured, struck
    assert report["st"]["mode"] == "lecture"


def test_a_report_says_what_was_not_measured() -> None:
    report = lesson_report()
    report["hands"] = None
    report["st"] = None
    page = render_html(report, {}, "en")
    assert "Hand raising is not measured in this room." in page
    assert "Talk analysis was off" in page
    assert page.count("<svg") == 2


def test_the_report_command_lists_shows_and_saves(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", create=True)
    store.put(Enrolled("s-a", "王小明", "g3", True, [np.zeros(128, np.float32)], 0.0))
    store.save()
    report = lesson_report()
    path = store.seal_record(report["lesson"], report, "report")
    assert b"s-a" not in path.read_bytes()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "report", *args, "--store", str(store.directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    (path.parent / "lesson-broken.enc").write_bytes(b"not sealed by this store")
    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "lesson-20261206-0800" in listed.stdout
    assert "mode lecture" in listed.stdout
    assert "lesson-broken.enc" in listed.stderr  # named, left out, the rest listed
    (path.parent / "lesson-broken.enc").unlink()
    shown = cli(report["lesson"], "--json")
    assert json.loads(shown.stdout)["attendance"]["students"]["s-a"]["status"] == "present"
    out = tmp_path / "report.html"
    saved = cli(report["lesson"], "--html", str(out), "--language", "zh-CN")
    assert saved.returncode == 0, saved.stderr
    assert "王小明" in out.read_text(encoding="utf-8")
    assert out.stat().st_mode & 0o777 == 0o600  # names and attendance
    again = cli(report["lesson"], "--html", str(out))
    assert again.returncode == 2
    assert "exists" in again.stderr
    missing = cli("lesson-nope")
    assert missing.returncode == 1
    assert "report list" in missing.stderr
    nothing = subprocess.run(
        [sys.executable, "-m", "agent.cli", "report", "list", "--store", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert nothing.returncode == 1
    assert "no lesson reports here yet" in nothing.stderr


class _BrokenModel(Detector):
    """A detector whose model fails on every frame (an onnxruntime error at run time)."""

    name = "broken"
    info = model_info("retinaface-mnet025")

    def detect(self, image: Any) -> list[Face]:
        raise RuntimeError("onnxruntime: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")


async def test_a_model_failing_on_every_frame_stops_sensing_not_the_agent(
    tmp_path: Path,
) -> None:

    class Service(SensingService):
        def _load(self) -> Pipeline:
            return Pipeline(self.config, detector=_BrokenModel(), identify=False)

    service = lessonless_service(
        tmp_path / "store", SensingConfig(enabled=True, sample_fps=20), service_class=Service
    )
    video = service.video
    hub = asyncio.create_task(video.run())
    try:
        await asyncio.wait_for(service.run(), 60)  # returns by itself: no crash, no spin
    finally:
        hub.cancel()
        await asyncio.gather(hub, return_exceptions=True)
    section = service.health_section()
    assert section is not None
    assert section["state"] == "failed"
    assert section["errors"] == MAX_FAILURES
    assert "RUNTIME_EXCEPTION" in section["reason"]


def test_without_face_recognition_no_embedder_is_loaded_and_old_records_expire(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "store", create=True)
    store.put(Enrolled("s-a", "A", "g", True, [np.zeros(128, np.float32)], 0.0))
    store.save()
    old, recent = lesson_report(), lesson_report()
    old["lesson"], recent["lesson"] = "lesson-old", "lesson-recent"
    old["end"], recent["end"] = 1_000_000.0, 5_000_000.0
    store.seal_record("lesson-old", old, "report")
    store.seal_record("lesson-recent", recent, "report")
    service = lessonless_service(tmp_path / "store", retention_days=30, face_recognition=False)
    service.pipeline = service._load()
    assert service.pipeline.embedder is None  # a roster is there, but never used
    assert service.pipeline.gallery is None
    service._refresh_roster()
    assert service.pipeline.embedder is None
    service._purge_expired(5_000_000.0 + 29 * 86_400)
    assert [p.stem for p in store.records("report")] == ["lesson-recent"]

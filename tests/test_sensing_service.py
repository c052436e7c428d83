"""The sensing service in a live lesson: frames from the hub, aggregates over MQTT
through the outbox, attendance sealed on the device, and nothing personal on the wire.

Also: the composition builds it only when ``sensing.enabled``; a corrupt model leaves it
``failed`` in health while the lesson goes on; its messages match schemas/sensing.v1.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest

from agent import contracts
from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config import SensingConfig
from agent.config.models import CaptureConfig, VideoConfig
from agent.sensing import (
    DlibResnetEmbedder,
    RetinaFaceDetector,
    SensingService,
    model_info,
    shipped_models_dir,
)
from agent.sensing.roster import Enrolled, open_store
from agent.sync import Outbox, ReliablePublisher
from agent.testkit import compose, cut_faces
from tests.brokers import BrokerUnderTest, eventually, observing
from tests.rooms import MAIN, ROOM2, SMALL, room, until_live
from tests.sensing_data import GROUP_PHOTOS, OBAMA, lessonless_service, load
from tests.test_contracts import check, schema

STUDENTS = {"s-obama": "欧巴马", "s-ana": "Ana", "s-ben": "Ben"}


def _sensing_schema() -> dict[str, Any]:
    return schema("sensing")


def test_the_schema_matches_the_contracts() -> None:
    node = _sensing_schema()
    check("sensing.minute", node["$defs"]["minute"], contracts.SensingMinute)
    check("sensing.attendance", node["$defs"]["attendance"], contracts.SensingAttendance)
    check("health.sensing", node["$defs"]["section"], contracts.SensingSection)
    check("sensing.st", node["$defs"]["st"], contracts.SensingSt)
    talk = node["$defs"]["section"]["properties"]["talk"]
    check("health.sensing.talk", talk, contracts.SensingTalk)
    hands = node["$defs"]["section"]["properties"]["hands"]
    check("health.sensing.hands", hands, contracts.SensingHands)


def _class_video(tmp_path: Path) -> tuple[Path, Path]:
    """A 640x360 video of a class (s-obama, s-ana and a stranger; s-ben absent) and an
    encrypted store with the three students enrolled from other photos / full size."""
    full = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    detector = RetinaFaceDetector(model_info("retinaface-mnet025"))
    embedder = DlibResnetEmbedder(model_info("dlib-resnet-v1"))
    group = cut_faces(GROUP_PHOTOS[:2], full)
    obama_seen = cut_faces([OBAMA[2]], full)[0]

    def describe(image: np.ndarray) -> np.ndarray:
        face = max(detector.detect(image), key=lambda f: f.height)
        return embedder.embed([embedder.align(image, face)])[0]

    store = open_store(tmp_path / "store", create=True)
    enrol = {
        "s-obama": [describe(load(OBAMA[0])), describe(load(OBAMA[1]))],
        "s-ana": [describe(group[0].image)],
        "s-ben": [describe(group[1].image)],
    }
    for student, embeddings in enrol.items():
        store.put(Enrolled(student, STUDENTS[student], "grade-3", True, embeddings, 0.0))
    store.save()
    frame, _ = compose(
        [obama_seen, group[0], group[2]], width=640, height=360, face_px=(90, 90), rows=1
    )
    path = tmp_path / "class.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 360))
    for i in range(20):  # a slight wobble, as a real camera has
        writer.write(np.roll(frame, i % 3, axis=1))
    writer.release()
    return path, tmp_path / "store"


@contextlib.asynccontextmanager
async def _running(*coroutines: Any) -> Any:
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow
async def test_a_lesson_with_sensing_on_sends_only_counts(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    video_path, store_dir = _class_video(tmp_path)
    capture = CaptureConfig(
        video=VideoConfig(source="file", path=video_path, width=640, height=360, fps=10),
        audio=SMALL.audio,
    )
    video = FrameHub(open_video_source(capture.video), capture)
    audio = AudioHub(open_audio_source(capture.audio), capture)
    config = SensingConfig(
        enabled=True, sample_fps=4, late_after_min=5, left_early_min=5, st_interval_s=1
    )
    async with (
        observing(mosquitto, "#") as observer,
        _running(video.run(), audio.run()),
        room(mosquitto, MAIN, main=True, hubs=(video, audio)) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        publisher = ReliablePublisher(main.link, Outbox(tmp_path / "outbox.db"))

        def lesson() -> str | None:
            live = main.service.live_lesson()
            return None if live is None else live[0]

        service = SensingService(
            config,
            video,
            publisher,
            main.link.topics.sensing,
            device=MAIN,
            lesson=lesson,
            store_dir=store_dir,
            minute_s=2.0,
            audio=audio,  # the talk analysis too: its S-T figures are on the wire
        )
        observed: list[int] = []  # part 2's analyses hook in here, in the worker thread
        service.observers.append(lambda now, image, faces: observed.append(len(faces)))
        async with _running(publisher.run(), service.run()):
            announcement = await main.host.start_lesson("maths")
            await until_live(room2)
            topic = main.link.topics.sensing
            minute = await observer.wait_for(
                topic,
                lambda m: (
                    json.loads(m.payload).get("lesson") == announcement.lesson_id
                    and json.loads(m.payload)["head_count"] == 3
                ),
                within=60,
            )
            section = service.health_section()
            assert section is not None
            assert section["state"] == "running"
            assert section["fps"] > 1
            assert section["enrolled"] == 3
            jsonschema.validate(section, _sensing_schema()["$defs"]["section"])
            await eventually(
                lambda: service.attendance is not None and len(service.attendance.seen) == 2,
                within=30,
                what="s-obama and s-ana recognised",
            )
            await main.host.end_lesson()
            done = await observer.wait_for(
                topic, lambda m: json.loads(m.payload)["kind"] == "attendance", within=30
            )
    assert max(observed) == 3
    sensing_schema = _sensing_schema()
    jsonschema.validate(json.loads(minute.payload), sensing_schema)
    counts = json.loads(done.payload)
    jsonschema.validate(counts, sensing_schema)
    assert (counts["present"], counts["absent"], counts["enrolled"]) == (2, 1, 3)
    assert counts["corrections"] == 0
    (st,) = [
        json.loads(m.payload)
        for m in observer.messages
        if m.topic == topic and json.loads(m.payload)["kind"] == "st"
    ]
    jsonschema.validate(st, sensing_schema)
    assert st["lesson"] == announcement.lesson_id
    assert st["role"] == "main"
    # The per-student record stayed on the device, sealed.
    store = open_store(store_dir)
    (record_path,) = (store_dir / "attendance").iterdir()
    record = store.open_record(record_path)
    assert record["students"]["s-ben"]["status"] == "absent"
    assert record["students"]["s-obama"]["status"] == "present"
    assert b"s-obama" not in record_path.read_bytes()
    shown = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "agent.cli",
            "sensing",
            "attendance",
            "--store",
            str(store_dir),
            record_path.stem,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "present 2" in shown.stdout
    # The lesson's report, sealed beside it: curves, S-T and attendance, shown by the command.
    (report_path,) = (store_dir / "report").iterdir()
    assert b"s-obama" not in report_path.read_bytes()
    report = store.open_record(report_path)
    assert report["lesson"] == announcement.lesson_id
    assert report["st"]["n"] == st["n"]
    assert report["minutes"]
    assert report["summary"]["head_count"] == counts["head_count"] == 3
    assert counts["head_up_rate"] is not None
    assert 0 < counts["head_up_rate"] <= 1
    page = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "agent.cli",
            "report",
            announcement.lesson_id,
            "--store",
            str(store_dir),
            "--language",
            "zh-CN",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "课堂报告" in page.stdout
    assert "欧巴马" in page.stdout
    assert re.search(r"s-ben +Ben +absent +not seen", shown.stdout), shown.stdout
    assert re.search(r"s-obama +欧巴马 +present +seen", shown.stdout), shown.stdout
    # Privacy: every message of the lesson, on every topic: no student id or name, no
    # boxes, no vector of numbers, no image.
    assert len(observer.messages) > 10
    for message in observer.messages:
        payload = message.payload
        for student, name in STUDENTS.items():
            assert student.encode() not in payload, message.topic
            assert name.encode() not in payload, message.topic
        for magic in (b"\xff\xd8\xff", b"\x89PNG", b"RIFF"):
            assert magic not in payload, message.topic
        if message.topic == topic:
            body = json.loads(payload)
            assert "box" not in payload.decode()
            assert all(not isinstance(v, (list, dict)) for v in body.values())
            assert len(payload) < 1024


async def test_a_corrupt_model_fails_sensing_with_its_name_and_nothing_else(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    shutil.copytree(shipped_models_dir(), models)
    (models / "dlib-resnet-v1.onnx").write_bytes(b"truncated")
    store = open_store(tmp_path / "store", create=True)
    store.put(Enrolled("s-a", "A", "g", True, [np.zeros(128, np.float32)], 0.0))
    store.save()

    class Nowhere:
        async def send(self, topic: str, payload: Any, kind: Any = "event") -> Any:
            raise AssertionError("nothing is published by a failed service")

    service = lessonless_service(
        tmp_path / "store", SensingConfig(enabled=True, models_dir=models), publisher=Nowhere()
    )
    video = service.video
    async with _running(video.run()):
        await asyncio.wait_for(service.run(), 30)  # returns: no restart loop
        assert video.stats().fps >= 0  # the hub (and so the lesson) is untouched
    section = service.health_section()
    assert section is not None
    assert section["state"] == "failed"
    assert "dlib-resnet-v1.onnx" in section["reason"]


def test_the_composition_builds_sensing_only_when_enabled(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.sensing import sensing_service

    base = {"identity": {"site": "s1", "room": "r1"}, "supervisor": {"state_dir": str(tmp_path)}}
    off = AgentConfig.model_validate(base)
    assert off.sensing.enabled is False
    assert sensing_service(off, None, None, "t", lambda: None) is None  # type: ignore[arg-type]
    on = AgentConfig.model_validate({**base, "sensing": {"enabled": True}})
    built = sensing_service(on, None, None, "t", lambda: ("lesson-9", "s1.r1"))  # type: ignore[arg-type]
    assert isinstance(built, SensingService)
    assert built.store_dir == tmp_path / "sensing"
    assert built.lesson() == "lesson-9"


def test_sensing_only_periods_come_from_the_timetable() -> None:
    import datetime

    from pydantic import ValidationError

    from agent.sensing.service import period_id

    periods = ["08:00-08:45", "13:30-14:15"]
    assert SensingConfig(periods=periods).periods == periods
    at = datetime.datetime(2026, 12, 4, 8, 44)
    assert period_id(periods, at) == "period-20261204-0800"
    assert period_id(periods, at.replace(hour=8, minute=45)) is None
    assert period_id(periods, at.replace(hour=13, minute=30)) == "period-20261204-1330"
    with pytest.raises(ValidationError, match="write a period as HH:MM-HH:MM"):
        SensingConfig(periods=["8am-9am"])
    with pytest.raises(ValidationError, match="the end must be after the start"):
        SensingConfig(periods=["09:00-08:00"])


def test_a_roster_enrolled_while_running_is_taken_at_the_next_lesson(tmp_path: Path) -> None:
    service = lessonless_service(tmp_path / "store")
    service.pipeline = service._load()
    assert service.pipeline.embedder is None  # no roster yet: head count only
    service._refresh_roster()
    assert service.pipeline.gallery is None
    store = open_store(tmp_path / "store", create=True)
    store.put(Enrolled("s-a", "A", "g", True, [np.zeros(128, np.float32)], 0.0))
    store.save()
    service._refresh_roster()
    assert service.pipeline.embedder is not None
    assert service.pipeline.gallery is not None
    assert service.pipeline.gallery.students == {"s-a"}


def test_the_daemon_carries_sensing_in_health_and_a_reload_restarts_only_it(
    tmp_path: Path,
) -> None:
    from tests.test_reload import agent_for

    off = agent_for(tmp_path)
    assert off.part("sensing") is None
    assert "sensing" not in off.health_sections()  # the reporter sends null
    on = agent_for(tmp_path, sensing={"enabled": True})
    service = on.part("sensing")
    assert isinstance(service, SensingService)
    assert service in on.services()
    assert on.health_sections()["sensing"]["state"] == "starting"
    # Turning sensing on, or changing a threshold, touches sensing alone, never the lesson.
    for change in ({"enabled": True}, {"enabled": True, "match_distance": 0.45}):
        plan = off.plan(agent_for(tmp_path, sensing=change).loaded, None)
        assert plan.restarts == ["sensing"], plan.describe()
        assert plan.live == ()

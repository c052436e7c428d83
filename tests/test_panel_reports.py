"""The lesson report on the teacher's panel: listed, shown and corrected over real HTTP.

A real room (tests/rooms.py: MqttLink on a real Mosquitto, the stream service, the panel
on a free port) serves reports sealed in a real encrypted store by the real report code.
Requests from another host come from this machine's own LAN address (the panel bound to
every address), so the token rule is exercised as a classroom's network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import numpy as np
import psutil
import pytest

from agent.config.models import UiConfig
from agent.sensing import LessonReports, announce_correction
from agent.sensing.privacy import purge_before, purge_student
from agent.sensing.roster import Enrolled, RosterStore, open_store
from agent.sync import Outbox, ReliablePublisher
from tests.brokers import BrokerUnderTest, observing
from tests.rooms import MAIN, PANEL_TOKEN, Room, room
from tests.rooms import panel_request as call
from tests.sensing_data import lesson_report
from tests.test_contracts import schema

EARLIER = "lesson-20261205-1000"
LATEST = "lesson-20261206-0800"
NAMES = {"s-a": "王小明", "s-b": "Ben Li"}  # s-c is in the lesson but left the roster


def seal_reports(directory: Path) -> RosterStore:
    """A store with a roster and two lessons' reports (the later one sealed first, so the
    list's order cannot come from the files' order)."""
    store = open_store(directory, create=True)
    for student, name in NAMES.items():
        store.put(Enrolled(student, name, "g3", True, [np.zeros(128, np.float32)], 0.0))
    store.save()
    day = 86_400.0
    store.seal_record(LATEST, lesson_report(lesson=LATEST, start=1_796_000_000.0), "report")
    earlier = lesson_report(lesson=EARLIER, start=1_796_000_000.0 - day)
    store.seal_record(EARLIER, earlier, "report")
    return store


@contextlib.asynccontextmanager
async def reporting_room(
    broker: BrokerUnderTest, store: RosterStore, outbox: Path
) -> AsyncIterator[Room]:
    """The main room with its panel serving ``store``'s reports; a correction sends the
    lesson's attendance counts through an outbox and publisher, as the composition wires
    it."""
    publishers: list[ReliablePublisher] = []

    async def corrected(report: dict[str, Any]) -> None:
        [publisher] = publishers
        await announce_correction(publisher, publisher.link.topics.sensing, MAIN, report)

    reports = LessonReports(store.directory)
    async with room(
        broker, MAIN, main=True, panel=True, reports=reports, corrected=corrected
    ) as main:
        publishers.append(ReliablePublisher(main.link, Outbox(outbox)))
        main.tasks.append(asyncio.create_task(publishers[0].run()))
        yield main


def lan_address() -> str:
    """This machine's own non-loopback IPv4 address: a request to it is not loopback."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if (
                address.family.name == "AF_INET"
                and not ipaddress.ip_address(address.address).is_loopback
            ):
                return str(address.address)
    pytest.skip("no non-loopback IPv4 address on this machine")


async def test_reports_are_listed_shown_and_corrected(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    store = seal_reports(tmp_path / "store")
    async with (
        observing(mosquitto, f"{mosquitto.prefix}/+/+/sensing") as observer,
        reporting_room(mosquitto, store, tmp_path / "outbox.db") as main,
    ):
        assert main.panel is not None
        base = main.panel.url
        status, listed = await call(base, "GET", "/api/reports")
        assert status == 200, listed
        rows = listed["reports"]
        assert [row["lesson"] for row in rows] == [LATEST, EARLIER]  # newest first
        assert rows[0]["minutes"] == 20.0
        assert (rows[0]["present"], rows[0]["late"], rows[0]["absent"]) == (1, 1, 1)
        assert rows[0]["mode"] == "lecture"
        assert "王小明" not in json.dumps(listed, ensure_ascii=False)  # a list holds no names

        status, shown = await call(base, "GET", f"/api/reports/{LATEST}?language=zh-CN")
        assert status == 200, shown
        page = shown["html"]
        assert shown["language"] == "zh-CN"
        assert "课堂报告" in page
        assert "王小明" in page  # names from the roster, not from the record
        assert page.count("<svg") == 5
        assert '<link rel="stylesheet" href="/report.css">' in page
        assert "<style>" not in page  # the CSP allows no inline style
        assert shown["statuses"] == {"s-a": "present", "s-b": "late", "s-c": "absent"}
        assert shown["correctable"] == ["present", "late", "absent"]
        status, english = await call(base, "GET", f"/api/reports/{LATEST}?language=en")
        assert status == 200
        assert "Lesson report" in english["html"]
        assert "课堂报告" not in english["html"]

        path = store.record_path(LATEST, "report")
        assert path is not None
        mtime = path.stat().st_mtime_ns
        before = time.time()
        status, corrected = await call(
            base,
            "POST",
            f"/api/reports/{LATEST}/corrections?language=en",
            {"student": "s-c", "status": "present"},
        )
        assert status == 200, corrected
        assert corrected["statuses"]["s-c"] == "present"
        assert 'class="corrected"' in corrected["html"]
        assert '<span class="was">(measured: absent)</span>' in corrected["html"]  # beside it
        sealed = store.open_record(path)
        [entry] = sealed["corrections"]
        assert entry["student"] == "s-c"
        assert (entry["status"], entry["was"]) == ("present", "absent")
        assert (entry["by"], entry["from"]) == ("loopback", "127.0.0.1")
        assert before <= entry["at"] <= time.time()
        assert sealed["attendance"]["students"]["s-c"]["status"] == "absent"  # as measured
        assert path.stat().st_mtime_ns == mtime  # retention and the list's order keep it
        assert b"s-c" not in path.read_bytes()  # sealed again, still encrypted

        _, relisted = await call(base, "GET", "/api/reports")
        row = relisted["reports"][0]
        assert (row["present"], row["absent"], row["corrections"]) == (2, 0, 1)

        # The fleet hears the corrected counts: the lesson's attendance message again.
        sent = await observer.wait_for(main.link.topics.sensing, within=30)
        counts = json.loads(sent.payload)
        jsonschema.validate(counts, schema("sensing"))
        assert (counts["kind"], counts["lesson"], counts["device"]) == ("attendance", LATEST, MAIN)
        assert (counts["present"], counts["late"], counts["absent"]) == (2, 1, 0)
        assert (counts["enrolled"], counts["corrections"]) == (3, 1)
        assert "s-c" not in sent.payload.decode()
        assert "王小明" not in sent.payload.decode()

        # The page itself is only the frame: it carries no report and needs no token.
        status, frame = await call(base, "GET", "/report")
        assert status == 200
        assert "王小明" not in frame
        assert 'src="/static/report.js"' in frame
        async with (
            aiohttp.ClientSession() as session,
            session.get(base + "report.css") as reply,
        ):
            assert reply.status == 200
            assert reply.content_type == "text/css"
            assert ".corrected" in await reply.text()


async def test_other_hosts_need_the_panel_token(mosquitto: BrokerUnderTest, tmp_path: Path) -> None:
    store = seal_reports(tmp_path / "store")
    reports = LessonReports(store.directory)
    address = lan_address()
    async with room(
        mosquitto, MAIN, main=True, panel=True, reports=reports, panel_bind="0.0.0.0"
    ) as main:
        assert main.panel is not None
        port = main.panel.url.rstrip("/").rsplit(":", 1)[1]
        lan = f"http://{address}:{port}/"
        right = {"Authorization": f"Bearer {PANEL_TOKEN}"}
        wrong = {"Authorization": "Bearer wrong-token-wrong-token"}
        correction = {"student": "s-a", "status": "late"}
        for method, path, body in (
            ("GET", "/api/reports", None),
            ("GET", f"/api/reports/{LATEST}", None),
            ("POST", f"/api/reports/{LATEST}/corrections", correction),
        ):
            status, refused = await call(lan, method, path, body)
            assert status == 401, (path, refused)
            assert "token" in refused["error"]
            assert "王小明" not in json.dumps(refused, ensure_ascii=False)
            status, _ = await call(lan, method, path, body, headers=wrong)
            assert status == 401, path
            status, answered = await call(lan, method, path, body, headers=right)
            assert status == 200, (path, answered)
        status, frame = await call(lan, "GET", "/report")  # the frame: no data in it
        assert status == 200
        assert "王小明" not in frame
        record = store.open_record(store.record_path(LATEST, "report"))  # type: ignore[arg-type]
        [entry] = record["corrections"]
        assert (entry["by"], entry["from"]) == ("panel-token", address)


async def test_bad_requests_name_the_field_and_the_fix(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    store = seal_reports(tmp_path / "store")
    async with (
        observing(mosquitto, f"{mosquitto.prefix}/+/+/sensing") as observer,
        reporting_room(mosquitto, store, tmp_path / "outbox.db") as main,
    ):
        assert main.panel is not None
        base = main.panel.url
        for bad in ("a.b", "x" * 65, "%C3%BCber", "lesson%20one"):
            for method, suffix, body in (
                ("GET", "", None),
                ("POST", "/corrections", {"student": "s-a", "status": "late"}),
            ):
                status, refused = await call(base, method, f"/api/reports/{bad}{suffix}", body)
                assert status == 400, (bad, refused)
                assert refused["error"].startswith("lesson:"), refused
        status, missing = await call(base, "GET", "/api/reports/lesson-never")
        assert status == 404
        assert "lesson-never" in missing["error"]
        assert "GET /api/reports" in missing["error"]
        status, missing = await call(
            base,
            "POST",
            "/api/reports/lesson-never/corrections",
            {"student": "s-a", "status": "late"},
        )
        assert status == 404
        assert store.record_path("lesson-never", "report") is None  # nothing made up

        corrections = f"/api/reports/{LATEST}/corrections"
        cases: list[tuple[Any, tuple[str, ...]]] = [
            ({}, ("student: Field required", "status: Field required")),
            ({"student": "s-a", "status": "sick"}, ("status:", "present", "late", "absent")),
            ({"student": "s-a", "status": "left_early"}, ("status:",)),  # measured only
            ({"student": "s-z", "status": "present"}, ("student: s-z is not in",)),
            ({"student": "S A", "status": "present"}, ("student:",)),
            ({"student": "s-a", "status": "late", "by": "me"}, ("by: unknown field",)),
            ({"student": 7, "status": "late"}, ("student:",)),
            (["s-a", "late"], ("JSON object",)),
        ]
        for body, words in cases:
            status, refused = await call(base, "POST", corrections, body)
            assert status == 400, (body, refused)
            for word in words:
                assert word in refused["error"], (body, refused["error"])
        status, refused = await call(base, "POST", corrections, raw=b"{student")
        assert (status, "JSON" in refused["error"]) == (400, True)
        status, _ = await call(
            base, "POST", corrections, correction_body(), headers={"Content-Type": "text/plain"}
        )
        assert status == 415
        status, _ = await call(
            base, "POST", corrections, correction_body(), headers={"Origin": "http://evil.example"}
        )
        assert status == 403
        status, refused = await call(base, "GET", f"/api/reports/{LATEST}?language=fr")
        assert status == 400
        assert refused["error"].startswith("language:")
        record = store.open_record(store.record_path(LATEST, "report"))  # type: ignore[arg-type]
        assert record["corrections"] == []  # nothing refused was written
        # ... nor sent: the first message the fleet hears is the first correction that holds.
        status, _ = await call(base, "POST", corrections, {"student": "s-c", "status": "late"})
        assert status == 200
        sent = await observer.wait_for(main.link.topics.sensing, within=30)
        assert json.loads(sent.payload)["corrections"] == 1
        assert len(observer.messages) == 1


def correction_body() -> dict[str, str]:
    return {"student": "s-a", "status": "late"}


async def test_concurrent_corrections_all_land(mosquitto: BrokerUnderTest, tmp_path: Path) -> None:
    store = seal_reports(tmp_path / "store")
    reports = LessonReports(store.directory)
    async with room(
        mosquitto, MAIN, main=True, panel=True, reports=reports, ui=UiConfig(language="en")
    ) as main:
        assert main.panel is not None
        base = main.panel.url
        wanted = [
            (student, status)
            for status in ("absent", "late", "present", "late")
            for student in ("s-a", "s-b", "s-c")
        ]
        replies = await asyncio.gather(
            *(
                call(
                    base,
                    "POST",
                    f"/api/reports/{LATEST}/corrections?language=zh-CN",
                    {"student": student, "status": status},
                )
                for student, status in wanted
            )
        )
        assert [status for status, _ in replies] == [200] * len(wanted), replies
        # ui.language is the room's: "en" wins over the page's zh-CN.
        assert all("Lesson report" in body["html"] for _, body in replies)
        record = store.open_record(store.record_path(LATEST, "report"))  # type: ignore[arg-type]
        landed = sorted((c["student"], c["status"]) for c in record["corrections"])
        assert landed == sorted(wanted)  # none lost to another's read-change-seal
        # Each entry's "was" is what the one before it left, in the order they landed.
        shown: dict[str, str] = {"s-a": "present", "s-b": "late", "s-c": "absent"}
        for entry in record["corrections"]:
            assert entry["was"] == shown[entry["student"]]
            shown[entry["student"]] = entry["status"]
        _, final = await call(base, "GET", f"/api/reports/{LATEST}")
        assert final["statuses"] == shown


async def test_a_room_without_reports_says_why(mosquitto: BrokerUnderTest, tmp_path: Path) -> None:
    empty = LessonReports(tmp_path / "empty")
    async with room(mosquitto, MAIN, main=True, panel=True, reports=empty) as main:
        assert main.panel is not None
        base = main.panel.url
        status, listed = await call(base, "GET", "/api/reports")
        assert (status, listed["reports"]) == (200, [])
        status, refused = await call(base, "GET", f"/api/reports/{LATEST}")
        assert status == 404
        assert "one is made when a lesson ends with sensing on" in refused["error"]
        assert "sensing.enabled" in refused["error"]
        status, refused = await call(base, "POST", f"/api/reports/{LATEST}/corrections", {})
        assert status == 400  # the body is checked first; nothing is opened for it
        assert not (tmp_path / "empty").exists()  # asking made no store and no key


def test_a_purge_removes_the_students_corrections_too(tmp_path: Path) -> None:
    store = seal_reports(tmp_path / "store")
    reports = LessonReports(store.directory)
    reports.correct(LATEST, "s-c", "present", at=1.0, by="loopback", source="127.0.0.1")
    reports.correct(LATEST, "s-a", "late", at=2.0, by="loopback", source="127.0.0.1")
    purge_student(open_store(store.directory), "s-c")
    report, names = reports.read(LATEST)
    assert [c["student"] for c in report["corrections"]] == ["s-a"]
    assert "s-c" not in json.dumps(report)
    assert names == NAMES


def test_the_daemons_panel_reads_the_sensing_store(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.runtime.composition import PARTS

    [panel] = [part for part in PARTS if part.name == "panel"]
    assert {"sensing.roster_dir", "sensing.key_file"} <= set(panel.reads)
    assert "sensing.enabled" not in panel.reads  # sensing on or off keeps the panel up
    base = {"identity": {"site": "s", "room": "r"}, "supervisor": {"state_dir": str(tmp_path)}}
    default = LessonReports.of(AgentConfig.model_validate(base))
    assert default == LessonReports(tmp_path / "sensing", None)
    chosen = AgentConfig.model_validate(
        {**base, "sensing": {"enabled": True, "roster_dir": str(tmp_path / "roster")}}
    )
    assert LessonReports.of(chosen) == LessonReports(tmp_path / "roster", None)


def test_a_correction_saved_during_a_retention_purge_does_not_bring_the_report_back(
    tmp_path: Path,
) -> None:
    """The purge deletes under the records' lock, so a correction that read the report
    first lands (and the report is deleted after it) instead of failing half-way on a
    file deleted under it, or writing back a record the purge deleted."""
    store = seal_reports(tmp_path / "store")
    reading = threading.Event()
    release = threading.Event()

    def slow_correction(report: dict[str, Any]) -> dict[str, Any]:
        reading.set()  # the correction holds the report it read ...
        assert release.wait(30)  # ... while the purge is asked to delete it
        return report

    failed: list[BaseException] = []

    def correct() -> None:
        try:
            store.update_record(LATEST, "report", slow_correction)
        except BaseException as exc:  # the thread's error is the finding
            failed.append(exc)

    correcting = threading.Thread(target=correct)
    correcting.start()
    assert reading.wait(30)
    purging = threading.Thread(target=purge_before, args=(open_store(store.directory), 2e9))
    purging.start()
    purging.join(0.5)  # without the lock it deletes at once, and the correction rewrites
    release.set()
    correcting.join(30)
    purging.join(30)
    assert not correcting.is_alive()
    assert not purging.is_alive()
    assert failed == []
    assert store.record_path(LATEST, "report") is None


async def test_a_correction_holds_when_the_fleet_cannot_be_told(
    mosquitto: BrokerUnderTest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = seal_reports(tmp_path / "store")

    async def broken(report: dict[str, Any]) -> None:
        raise OSError("outbox: disk full")

    reports = LessonReports(store.directory)
    async with room(
        mosquitto, MAIN, main=True, panel=True, reports=reports, corrected=broken
    ) as main:
        assert main.panel is not None
        status, corrected = await call(
            main.panel.url,
            "POST",
            f"/api/reports/{LATEST}/corrections",
            {"student": "s-c", "status": "late"},
        )
    assert status == 200, corrected  # saved: the teacher's work is not lost
    assert corrected["statuses"]["s-c"] == "late"
    record = store.open_record(store.record_path(LATEST, "report"))  # type: ignore[arg-type]
    assert [c["status"] for c in record["corrections"]] == ["late"]
    assert "corrected counts not sent to the fleet: outbox: disk full" in caplog.text

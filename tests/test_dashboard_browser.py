"""The dashboard page in a real browser (Debian's Chromium, headless, driven by Playwright).

A simulated fleet publishes on a real Mosquitto; one more room runs as its own process
over a real `MqttLink`, so ``kill -9`` makes the broker publish its Last Will. The page
must list the rooms, show a new alert within 2 s, turn the killed room offline, filter
by school and status (kept in the URL hash), fetch nothing from another site, show a
lesson's sensing figures as a room publishes them, and leave screenshots in artifacts/
(dashboard.png, dashboard-sensing.png).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.dashboard import DashboardConfig, DashboardServer
from agent.locales import catalogue
from agent.testkit import SimFleet, fleet_layout
from tests.brokers import DASHBOARD, BrokerUnderTest, observing
from tests.browsers import ARTIFACTS, chromium, needs_chromium, until

REPO = Path(__file__).resolve().parents[1]
KILLED = "stone-bridge.room-101"  # the room in its own process

pytestmark = [
    pytest.mark.slow,
    needs_chromium,
]

VISIBLE_ROWS = """() => [...document.querySelectorAll('tr[data-id]')]
    .filter((row) => row.offsetParent !== null).map((row) => row.dataset.id)"""


@contextlib.asynccontextmanager
async def room_process(broker: BrokerUnderTest) -> AsyncIterator[asyncio.subprocess.Process]:
    """A simulated room in a child process with its own connection and Last Will."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from agent.testkit.simulate import main; sys.exit(main())",
        "--broker",
        broker.url,
        "--prefix",
        broker.prefix,
        "--room",
        KILLED,
        "--interval",
        "1",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.decode().strip() == f"ready {KILLED}", line
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_the_page_shows_the_fleet_live(mosquitto: BrokerUnderTest) -> None:
    specs, groups = fleet_layout(20, per_school=5)
    fleet = SimFleet(
        mosquitto.broker_config(None), specs, groups, interval_s=1.0, offline=0.1, silent=0.05
    )
    server = DashboardServer(
        DashboardConfig(broker=mosquitto.broker_config(DASHBOARD), port=0, health_interval_s=1.0)
    )
    tasks = [
        asyncio.create_task(server.run(), name="test-dashboard"),
        asyncio.create_task(fleet.run(), name="test-fleet"),
    ]
    try:
        async with asyncio.timeout(20):
            await server.wait_ready()
            await fleet.wait_ready()
        async with room_process(mosquitto) as child, chromium() as browser:
            await check_the_page(browser, server, fleet, child)
            await check_profiles(browser, server, mosquitto, fleet)
            await check_sensing(browser, server, mosquitto)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def check_the_page(
    browser: Any, server: DashboardServer, fleet: SimFleet, child: asyncio.subprocess.Process
) -> None:
    page = await browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    urls: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda request: urls.append(request.url))
    await page.goto(server.url)

    # Every room, the shared fleet's and the one in its own process.
    rooms = len(fleet.rooms) + 1
    took = await until(
        page,
        f"document.querySelectorAll('tr[data-id]').length === {rooms} && "
        f"document.querySelector('tr[data-id=\"{KILLED}\"]').dataset.status === 'online'",
        within=15,
        what=f"{rooms} rooms",
    )
    print(f"\npage listed {rooms} rooms {took:.2f} s after loading")
    assert await page.text_content("#k-rooms") == str(rooms)
    assert await page.text_content("#conn-text") == "Live"

    # An alert published on MQTT shows on the page within 2 s.
    device = next(
        d for d in sorted(fleet.rooms) if d not in fleet.offline and d not in fleet.silent
    )
    chip = f'tr[data-id="{device}"] .chip[data-rule="camera_frozen"]'
    started = time.monotonic()
    await fleet.raise_alert(device, "camera_frozen", "critical", "camera frozen for 10 s")
    await until(page, f"document.querySelector('{chip}') !== null", within=10, what="the alert")
    delay = time.monotonic() - started
    print(f"alert: MQTT publish -> visible on the page in {delay * 1000:.0f} ms")
    assert delay < 2.0, f"the alert took {delay:.2f} s to show"
    assert "Camera frozen" in (await page.text_content(chip) or "")
    assert "CRIT" in (await page.text_content(chip) or "")  # severity in words, not only colour

    # A killed agent (no DISCONNECT): the broker publishes its Last Will, the room goes offline.
    started = time.monotonic()
    child.kill()
    await child.wait()
    row = f'tr[data-id="{KILLED}"]'
    await until(
        page,
        f"document.querySelector('{row}').dataset.status === 'offline'",
        within=15,
        what="the killed room offline",
    )
    print(f"kill -9 -> room offline on the page in {(time.monotonic() - started) * 1000:.0f} ms")
    assert await page.text_content(f"{row} .st-text") == "Offline"

    # Filters: school, then status; both kept in the URL hash.
    await page.select_option("#f-school", "hillside")
    visible = await page.evaluate(VISIBLE_ROWS)
    assert sorted(visible) == sorted(d for d in fleet.rooms if d.startswith("hillside."))
    assert await page.evaluate("location.hash") == "#school=hillside"
    await page.select_option("#f-school", "")
    await page.click("button[data-status='offline']")
    offline = sorted([KILLED, *(d for d, why in fleet.offline.items() if why != "shutdown")])
    shut_down = sorted(d for d, why in fleet.offline.items() if why == "shutdown")
    assert sorted(await page.evaluate(VISIBLE_ROWS)) == sorted(offline + shut_down)
    assert await page.evaluate("location.hash") == "#status=offline"
    assert await page.get_attribute("button[data-status='offline']", "aria-pressed") == "true"
    # A bookmarked view opens filtered.
    await page.goto(f"{server.url}#school=stone-bridge&status=offline")
    await page.reload()
    await until(
        page, f"document.querySelector('{row}') !== null", within=10, what="the reloaded page"
    )
    assert await page.evaluate(VISIBLE_ROWS) == [KILLED]
    assert await page.input_value("#f-school") == "stone-bridge"

    # Back to everything, wait for the silent room to turn stale, and keep a screenshot.
    await page.select_option("#f-school", "")
    await page.click("button[data-status='all']")
    if fleet.silent:
        stale = next(iter(fleet.silent))
        await until(
            page,
            f"document.querySelector('tr[data-id=\"{stale}\"]').dataset.status === 'stale'",
            within=10,
            what="a stale room",
        )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    assert errors == []
    base = server.url
    assert urls
    assert all(url.startswith(base) for url in urls), [u for u in urls if not u.startswith(base)]


async def check_profiles(
    browser: Any, server: DashboardServer, broker: BrokerUnderTest, fleet: SimFleet
) -> None:
    """A room's answer to pushed profiles shows in its row; the filter finds the broken."""
    page = await browser.new_page(viewport={"width": 1600, "height": 1000})
    await page.goto(server.url)
    device = sorted(fleet.rooms)[0]
    site, room = device.split(".")
    report = {
        "v": 1,
        "device": device,
        "groups": [],
        "time": "2026-12-04T10:00:00Z",
        "keys": {"version": 0, "pinned": [], "last": None},
        "effective": {f"school:{site}": 3},
        "layers": {
            f"school:{site}": {
                "state": "applied",
                "version": 3,
                "scope": f"school:{site}",
                "reason": "",
                "code": "",
                "since": "2026-12-04T10:00:00Z",
                "applied_version": 3,
                "wave": None,
            },
            f"room:{device}": {
                "state": "rolled-back",
                "version": 4,
                "scope": f"room:{device}",
                "reason": "after 4 s: the broker is not connected",
                "code": "check-failed",
                "since": "2026-12-04T10:00:00Z",
                "applied_version": None,
                "wave": None,
            },
        },
    }
    async with observing(broker) as publisher:
        await publisher.publish(
            f"{broker.prefix}/{site}/{room}/config/reported", json.dumps(report), retain=True
        )
    chip = f'tr[data-id="{device}"] .chip[data-state="rolled-back"]'
    await until(
        page,
        f"document.querySelector('{chip}') !== null",
        within=10,
        what="the rolled-back profile",
    )
    assert "v4" in (await page.text_content(chip) or "")
    assert "broker is not connected" in (await page.get_attribute(chip, "title") or "")
    await page.click('button[data-status="profiles"]')
    visible = await page.evaluate(
        "[...document.querySelectorAll('tr[data-id]')]"
        ".filter(r => !r.hidden).map(r => r.dataset.id)"
    )
    assert visible == [device]


async def check_sensing(browser: Any, server: DashboardServer, broker: BrokerUnderTest) -> None:
    """A room's sensing messages (as the sensing service sends them) fill the lesson
    view: the latest minute while the lesson runs, then its S-T and attendance counts."""
    page = await browser.new_page(viewport={"width": 1600, "height": 1000})
    await page.goto(server.url)
    lesson = next(iter(server.model.lessons.values()))
    device = lesson.main
    site, room = device.split(".")
    topic = f"{broker.prefix}/{site}/{room}/sensing"
    base = {"v": 1, "ts": time.time(), "device": device, "lesson": lesson.lesson_id}
    minute = {
        "kind": "minute",
        "minute_start": time.time() - 60,
        "samples": 240,
        "head_count": 31,
        "head_count_max": 32,
        "head_up_rate": 0.9,
        "present": 30,
        "unknown": 0,
        "hand_raises": 4,
    }
    st = {"kind": "st", "role": "main", "samples": "TTTS", "interval_s": 30.0, "n": 4}
    st |= {"n_t": 3, "runs": 2, "rt": 0.75, "ch": 0.25, "mode": "lecture"}
    attendance = {"kind": "attendance", "present": 28, "late": 2, "left_early": 0}
    attendance |= {"absent": 3, "unknown": 1, "enrolled": 33, "head_count": 30}
    attendance |= {"head_count_max": 32, "head_up_rate": 0.74}
    row = f'tr.sensing-room[data-device="{device}"]'

    def cell(name: str) -> str:
        return f'{row} td[data-f="{name}"]'

    async with observing(broker) as publisher:
        await publisher.publish(topic, json.dumps(base | minute))
        await until(
            page, f"document.querySelector('{row}') !== null", within=10, what="the live minute"
        )
        assert await page.text_content(cell("head_count")) == "31"
        assert await page.text_content(cell("head_up_rate")) == "90%"
        assert await page.text_content(cell("hand_raises")) == "4"
        assert await page.text_content(cell("rt")) == "\N{EN DASH}"  # not before the end
        await publisher.publish(topic, json.dumps(base | st))
        await publisher.publish(topic, json.dumps(base | attendance))
    await until(
        page,
        f"document.querySelector('{cell('present')}').textContent === '28'",
        within=10,
        what="the lesson's attendance counts",
    )
    names = ["head_count", "head_up_rate", "hand_raises", "rt", "ch", "mode"]
    names += ["present", "late", "absent"]
    figures = {name: await page.text_content(cell(name)) for name in names}
    assert figures == {
        "head_count": "30",
        "head_up_rate": "74%",
        "hand_raises": "4",  # the attendance message did not carry the lesson's total
        "rt": "0.75",
        "ch": "0.25",
        "mode": "lecture",
        "present": "28",
        "late": "2",
        "absent": "3",
    }
    total = f'tr.sensing-total[data-lesson="{lesson.lesson_id}"]'
    assert lesson.subject in (await page.text_content(total) or "")
    assert await page.text_content(f'{total} td[data-f="present"]') == "28"
    assert await page.locator(f"{row} .corrected").count() == 0
    # The teacher corrects two absences on the panel: the room sends its counts again.
    corrected = attendance | {"present": 30, "absent": 1, "corrections": 2}
    async with observing(broker) as publisher:
        await publisher.publish(topic, json.dumps(base | corrected | {"ts": time.time() + 1}))
    await until(
        page,
        f"document.querySelector('{cell('present')}').textContent === '30'",
        within=10,
        what="the corrected attendance counts",
    )
    assert (await page.text_content(cell("absent")) or "").startswith("1")
    mark = page.locator(f"{row} .corrected")
    expected = catalogue("en")["dash.sensing.corrected"].replace("{n}", "2")
    assert await mark.get_attribute("title") == expected
    await page.locator("#sensing-part").screenshot(path=str(ARTIFACTS / "dashboard-sensing.png"))

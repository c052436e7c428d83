"""The lesson report through the teacher's panel, in a real browser (Debian's Chromium).

A Chinese and an English browser open the panel of a real room whose store holds two
sealed reports, follow the panel's "lesson report" link, and find every chart drawn (each
SVG holds shapes with a real size on screen), the attendance table with the roster's
names, no text missing from the catalogue and no request to anything but the room's
own panel (requests elsewhere are also blocked). A correction made with the row's menu
shows beside the measured status and is sealed in the store. From another computer the
page needs the token in its URL fragment. Screenshots go to /tmp/report-shots/.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest

from agent import locales
from agent.sensing import LessonReports
from agent.sensing.roster import open_store
from tests.brokers import BrokerUnderTest
from tests.browsers import chromium, needs_chromium, until
from tests.rooms import MAIN, PANEL_TOKEN, room
from tests.sensing_data import lesson_report
from tests.test_panel_reports import LATEST, NAMES, lan_address, seal_reports

pytestmark = [pytest.mark.slow, needs_chromium, pytest.mark.timeout(180)]

SHOTS = Path("/tmp/report-shots")
CHARTS = """() => [...document.querySelectorAll('#report svg')].map((svg) => {
  const box = svg.getBoundingClientRect();
  const drawn = svg.getBBox();
  return {
    label: svg.getAttribute('aria-label'),
    shapes: svg.querySelectorAll('path, rect, circle, line').length,
    texts: svg.querySelectorAll('text').length,
    width: box.width, height: box.height, drawnWidth: drawn.width, drawnHeight: drawn.height,
  };
})"""
ROWS = """() => [...document.querySelectorAll('#report tbody tr')].map((row) =>
  [...row.cells].map((cell) => cell.querySelector('select') ? cell.querySelector('select').value
                                                          : cell.innerText.trim()))"""


class Watched:
    """A page in a browser context of ``locale``: its console errors, every URL it asked
    for, and any request to another host blocked (and kept, to fail the test)."""

    def __init__(self, page: Any, allowed: str) -> None:
        self.page = page
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.blocked: list[str] = []
        self.allowed = allowed
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda request: self.urls.append(request.url))

    @classmethod
    async def open(cls, browser: Any, locale: str, allowed: str) -> Watched:
        context = await browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
        watched = cls(await context.new_page(), allowed)

        async def gate(route: Any) -> None:
            if route.request.url.startswith(allowed) or route.request.url.startswith("data:"):
                await route.continue_()
            else:
                watched.blocked.append(route.request.url)
                await route.abort()

        await context.route("**/*", gate)
        return watched

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.blocked, self.blocked
        assert all(u.startswith((self.allowed, "data:")) for u in self.urls), self.urls


@pytest.fixture
def shots() -> Path:
    SHOTS.mkdir(exist_ok=True)
    return SHOTS


async def test_the_report_through_the_panel_in_both_languages(
    mosquitto: BrokerUnderTest, tmp_path: Path, shots: Path
) -> None:
    store = seal_reports(tmp_path / "store")
    reports = LessonReports(store.directory)
    async with (
        room(mosquitto, MAIN, main=True, panel=True, reports=reports, panel_bind="0.0.0.0") as main,
        chromium() as browser,
    ):
        assert main.panel is not None
        base = main.panel.url
        try:
            # Chinese: the assistant teacher sets the absent s-c present.
            await through_the_panel(browser, base, "zh-CN", "s-c", "present")
            # English: s-c's correction is there; s-b is set absent.
            await through_the_panel(browser, base, "en", "s-b", "absent")
            await from_another_computer(browser, base)
        finally:
            for context in browser.contexts:
                await context.close()
    record = store.open_record(store.record_path(LATEST, "report"))  # type: ignore[arg-type]
    assert [(c["student"], c["status"], c["by"]) for c in record["corrections"]] == [
        ("s-c", "present", "loopback"),
        ("s-b", "absent", "loopback"),
    ]


async def through_the_panel(
    browser: Any, base: str, language: str, student: str, status: str
) -> None:
    text = locales.catalogue(language)  # type: ignore[arg-type]
    watched = await Watched.open(browser, language, base)
    page = watched.page
    await page.goto(base)
    await until(page, "!document.getElementById('reports').hidden", within=15, what="reports")
    latest = await page.inner_text("#latest-report")
    assert latest.startswith(text["panel.report_latest"].split("{")[0]), latest
    assert await page.locator("#report-list li").count() == 2
    await page.screenshot(path=str(SHOTS / f"panel-{language}.png"))
    await page.click("#latest-report")
    await until(page, f"document.body.dataset.lesson === {LATEST!r}", within=15, what="report")
    assert await page.evaluate("document.documentElement.lang") == language
    assert await page.evaluate("document.documentElement.dataset.i18nMissing") is None
    assert await page.inner_text("h1") == text["report.title"]

    charts = await page.evaluate(CHARTS)
    assert [c["label"] for c in charts] == [
        text["report.chart.head_up"],
        text["report.chart.head_count"],
        text["report.chart.hands"],
        text["report.chart.st"],
        text["report.chart.rt_ch"],
    ]
    for chart in charts:
        assert chart["shapes"] >= 3, chart  # the S-T chart: its square, diagonal, curve
        assert chart["texts"] >= 2, chart  # axis labels
        assert chart["width"] > 300, chart
        assert chart["height"] > 100, chart
        assert chart["drawnWidth"] > 100, chart
        assert chart["drawnHeight"] > 100, chart
    assert await page.locator("#report .figure").count() == 8

    rows = {row[0]: row for row in await page.evaluate(ROWS)}
    assert set(rows) == {"s-a", "s-b", "s-c"}
    assert rows["s-a"][1] == NAMES["s-a"]
    assert rows["s-c"][1] == text["report.unnamed"]  # in the lesson, no longer on the roster
    assert rows["s-a"][2] == text["report.status.present"]
    assert rows["s-a"][-1] == "present"  # the row's menu holds its status now
    table_head = await page.inner_text("#report thead")
    assert text["report.page.correct"] in table_head

    measured = rows[student][2]
    await page.select_option(f'tr[data-student="{student}"] select', status)
    await until(
        page,
        f"document.getElementById('report-message').textContent === {text['report.page.saved']!r}",
        within=15,
        what="the correction saved",
    )
    cell = page.locator(f'tr[data-student="{student}"] td').nth(2)
    assert await cell.locator(".corrected").inner_text() == text[f"report.status.{status}"]
    was = text["report.measured"].format(status=measured)
    assert await cell.locator(".was").inner_text() == was  # the measured one, beside it
    title = await cell.locator(".corrected").get_attribute("title")
    assert title is not None
    assert "127.0.0.1" in title
    assert await page.locator(f'tr[data-student="{student}"] select').input_value() == status
    # The picker's line for the lesson counts as the report's figure does, corrected.
    attended, total = (await page.locator(".figure b").last.inner_text()).split(" / ")
    line = re.escape(text["common.report_item"])
    for name, value in (("attended", attended), ("total", total)):
        line = line.replace(re.escape("{" + name + "}"), value)
    line = re.sub(r"\\\{\w+\\\}", ".+?", line)
    picked = "document.querySelector('#report-pick').selectedOptions[0].text"
    await until(
        page,
        f"new RegExp({line!r}).test({picked})",
        within=15,
        what=f"the picker's counts {attended}/{total}",
    )
    await page.screenshot(path=str(SHOTS / f"report-{language}.png"), full_page=True)
    watched.check()


async def from_another_computer(browser: Any, base: str) -> None:
    port = base.rstrip("/").rsplit(":", 1)[1]
    lan = f"http://{lan_address()}:{port}/"
    needed = locales.catalogue("en")["report.page.need_token"]
    watched = await Watched.open(browser, "en", lan)
    await watched.page.goto(f"{lan}report#lesson={LATEST}")
    await until(
        watched.page,
        f"document.getElementById('report-message').textContent === {needed!r}",
        within=15,
        what="the token is needed",
    )
    assert await watched.page.locator("#report svg").count() == 0
    watched.errors = [e for e in watched.errors if "401" not in e]  # the refused fetches
    watched.check()
    watched = await Watched.open(browser, "en", lan)
    await watched.page.goto(f"{lan}report#token={PANEL_TOKEN}&lesson={LATEST}")
    await until(
        watched.page, f"document.body.dataset.lesson === {LATEST!r}", within=15, what="report"
    )
    assert await watched.page.locator("#report svg").count() == 5
    assert await watched.page.locator("#back").is_hidden()
    watched.check()


async def test_the_panel_links_the_report_once_the_lesson_ends(
    mosquitto: BrokerUnderTest, tmp_path: Path
) -> None:
    store = open_store(tmp_path / "store", create=True)
    reports = LessonReports(store.directory)
    async with (
        room(mosquitto, MAIN, main=True, panel=True, reports=reports) as main,
        chromium() as browser,
    ):
        assert main.panel is not None
        watched = await Watched.open(browser, "en", main.panel.url)
        page = watched.page
        try:
            await page.goto(main.panel.url)
            await until(page, "document.body.dataset.ready === '1'", within=10, what="panel")
            assert await page.locator("#reports").is_hidden()  # no report yet
            await page.click("#lesson-button")
            button = "document.querySelector('#lesson-button')"
            await until(page, f"{button}.classList.contains('end')", within=15, what="live")
            await page.click("#lesson-button")
            await until(page, f"{button}.classList.contains('start')", within=15, what="end")
            # The sensing service seals the report a moment after the end.
            lesson = lesson_report(lesson="lesson-just-ended", start=time.time() - 1200)
            await asyncio.to_thread(store.seal_record, "lesson-just-ended", lesson, "report")
            # Asked for every 2 s after a lesson ends (every 15 s otherwise).
            await until(page, "!document.getElementById('reports').hidden", within=8, what="link")
            href = await page.get_attribute("#latest-report", "href")
            assert href == "/report#lesson=lesson-just-ended"
            watched.check()
        finally:
            for context in browser.contexts:
                await context.close()

"""The pages in both languages, in a real browser (Debian's Chromium, headless).

The teacher panel, the kiosk and the watch page of real rooms, and the dashboard over a
simulated fleet, are loaded with a Chinese and an English browser and with ui.language
forcing either. Every text must come from the chosen catalogue (agent/locales), no line
of a Chinese page may be an English catalogue text, times follow the locale, and the
page must report no missing key: the lookup marks any key it could not find on <html>
and logs a console error, which fails the test (shown working at the end).
Screenshots of the Chinese pages are left in artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import pytest

from agent import locales
from agent.config.models import UiConfig
from agent.dashboard import DashboardConfig, DashboardServer
from agent.testkit import SimFleet, fleet_layout
from tests.brokers import DASHBOARD, BrokerUnderTest
from tests.browsers import ARTIFACTS, chromium, needs_chromium, until
from tests.rooms import MAIN, ROOM2, ROOM3, Room, room

pytestmark = [pytest.mark.slow, needs_chromium, pytest.mark.timeout(240)]

ZH = locales.catalogue("zh-CN")
EN = locales.catalogue("en")

# The room's name replaces the heading's default text: not a catalogue text.
I18N_NODES = """() => [...document.querySelectorAll('[data-i18n]:not(#room-name)')]
    .map((node) => [node.dataset.i18n, node.textContent])"""
VISIBLE_LINES = (
    """() => document.body.innerText.split(/[\\n\\t]/).map((l) => l.trim()).filter(Boolean)"""
)


def pattern(text: str) -> re.Pattern[str]:
    """A catalogue text as a regular expression: each {placeholder} matches anything."""
    parts = re.split(r"\{\w+\}", text)
    return re.compile(".+?".join(re.escape(part) for part in parts))


def shows(text: str, template: str) -> bool:
    return pattern(template).fullmatch(text) is not None


class Page:
    """A page that collects its console errors and every URL it asks for."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda request: self.urls.append(request.url))

    async def text(self, selector: str) -> str:
        return str(await self.page.text_content(selector) or "")

    async def check(self, language: str, base: str) -> None:
        """Texts from ``language``'s catalogue only; nothing missing; nothing from elsewhere."""
        messages = locales.catalogue(language)  # type: ignore[arg-type]
        assert await self.page.evaluate("document.documentElement.lang") == language
        for key, text in await self.page.evaluate(I18N_NODES):
            assert key in messages, key
            # The node may show another key's text by now (a button's state, the title
            # with the room's name): still this catalogue's.
            assert any(shows(text, t) for t in messages.values()), (
                f"{key}: {text!r} is not a {language} text"
            )
        if language == "zh-CN":
            english = {v for k, v in EN.items() if v != ZH[k] and "{" not in v}
            lines = await self.page.evaluate(VISIBLE_LINES)
            assert not english & set(lines), f"English on a Chinese page: {english & set(lines)}"
        missing = await self.page.evaluate("document.documentElement.dataset.i18nMissing")
        assert missing is None, f"keys missing from {language}.json: {missing}"
        assert not self.errors, self.errors
        assert all(u.startswith(base) for u in self.urls), self.urls


async def page_in(browser: Any, locale: str, url: str, **viewport: int) -> Page:
    """A page of a new browser context whose languages are ``locale``, at ``url``."""
    context = await browser.new_context(
        locale=locale, viewport=viewport or {"width": 1280, "height": 800}
    )
    page = Page(await context.new_page())
    await page.page.goto(url)
    return page


async def close_pages(browser: Any) -> None:
    """Close the pages before their server stops: an open WebSocket or peer connection
    would leave the server's handler tasks behind."""
    for context in browser.contexts:
        await context.close()


async def test_the_pages_in_both_languages(mosquitto: BrokerUnderTest) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with chromium() as browser:
        await check_the_panel(browser, mosquitto)
        await check_the_dashboard(browser, mosquitto)
        await check_that_a_missing_key_is_reported(browser, mosquitto)


async def check_the_panel(browser: Any, mosquitto: BrokerUnderTest) -> None:
    async with (
        room(mosquitto, MAIN, main=True, panel=True) as main,
        room(mosquitto, ROOM2, panel=True) as room2,
    ):
        try:
            await panel_pages(browser, main, room2)
        finally:
            await close_pages(browser)


async def panel_pages(browser: Any, main: Room, room2: Room) -> None:
    assert main.panel is not None
    assert room2.panel is not None
    base = main.panel.url
    # ui.language: auto, a Chinese browser: Chinese.
    panel = await page_in(browser, "zh-CN", base, width=1280, height=900)
    await until(panel.page, "document.body.dataset.ready === '1'", within=10, what="panel")
    assert await panel.text("#lesson-button") == ZH["panel.start_lesson"] == "开始上课"
    assert await panel.text("#lesson-info") == ZH["panel.no_lesson"]
    assert await panel.text("#mute-camera") == ZH["panel.camera_on"]
    placeholder = await panel.page.get_attribute("#subject", "placeholder")
    assert placeholder == ZH["panel.subject_placeholder"]

    kiosk = await page_in(browser, "zh-CN", room2.panel.url)
    await until(
        kiosk.page,
        f"document.getElementById('slate').textContent === {ZH['kiosk.waiting']!r}",
        within=10,
        what="the waiting slate, in Chinese",
    )
    assert await kiosk.text("#slate") == "等待上课"
    assert await kiosk.text("#join-state") == ZH["kiosk.state.waiting"]
    assert await kiosk.text("#hand-button") == "举手"

    # The lesson, in Chinese: button, tiles' badges and figures, kiosk, hands.
    await panel.page.click("#lesson-button")
    await until(
        panel.page,
        f"document.getElementById('lesson-button').textContent === {ZH['panel.end_lesson']!r}",
        within=15,
        what="下课 on the button",
    )
    assert shows(await panel.text("#lesson-info"), ZH["panel.live_info"])
    assert shows(await panel.text("#message"), ZH["panel.lesson_started"])
    tile = f'.tile[data-room="{ROOM2}"]'
    await until(
        panel.page,
        f"document.querySelector('{tile}')?.dataset.state === 'live' && "
        f"document.querySelector('{tile} .figures').textContent.includes('帧/秒')",
        within=30,
        what=f"{ROOM2} live with its figures",
    )
    assert await panel.text(f"{tile} .badge") == ZH["panel.room_state.live"]
    figures = await panel.text(f"{tile} .figures")
    assert re.fullmatch(r"\d+ 帧/秒( · 延迟 \d+ 毫秒)?( · 丢包 [\d.]+%)?( · 低清画面)?", figures)
    missing_room = f'.tile[data-room="{ROOM3}"] .badge'
    assert await panel.text(missing_room) == ZH["panel.room_state.joining"]
    await until(kiosk.page, "document.getElementById('slate').hidden", within=30, what="live")
    assert await kiosk.text("#join-state") == ZH["kiosk.state.live"]
    assert shows(await kiosk.text("#lesson-info"), ZH["kiosk.lesson_from"])
    await kiosk.page.click("#hand-button")
    await until(
        kiosk.page,
        f"document.getElementById('hand-button').textContent === {ZH['kiosk.lower_hand']!r}",
        within=10,
        what="取消举手",
    )
    await until(
        panel.page,
        f"!document.querySelector('{tile} .hand').hidden",
        within=10,
        what="the raised hand on the tile",
    )
    assert await panel.page.get_attribute(f"{tile} .hand", "title") == ZH["panel.lower_hand"]
    await panel.page.click("#mute-microphone")
    await until(
        panel.page,
        f"document.getElementById('mute-microphone').textContent === "
        f"{ZH['panel.microphone_off']!r}",
        within=10,
        what="麦克风已静音",
    )
    await panel.page.wait_for_timeout(500)  # a frame of the tiles' video for the picture
    await panel.page.screenshot(path=str(ARTIFACTS / "panel-zh-CN.png"))
    await kiosk.page.screenshot(path=str(ARTIFACTS / "kiosk-zh-CN.png"))
    await panel.check("zh-CN", base)

    watch = await page_in(browser, "zh-CN", main.panel.watch_url())
    await until(
        watch.page,
        f"document.getElementById('watch-state').textContent === {ZH['watch.state.connected']!r}",
        within=30,
        what="已连接 on the watch page",
    )
    await watch.page.click("#unmute")
    assert await watch.text("#unmute") == ZH["watch.sound_off"]
    assert await watch.page.title() == ZH["watch.title"]
    await watch.check("zh-CN", base)

    await panel.page.click("#lesson-button")  # 下课
    await until(
        kiosk.page,
        "!document.getElementById('slate').hidden && "
        f"document.getElementById('slate').textContent === {ZH['kiosk.waiting']!r}",
        within=20,
        what="等待上课 after the lesson",
    )
    assert await panel.text("#message") == ZH["panel.lesson_ended"]
    await kiosk.check("zh-CN", room2.panel.url)

    # auto, an English browser: English (the texts the other browser tests read).
    english = await page_in(browser, "en-US", base)
    await until(english.page, "document.body.dataset.ready === '1'", within=10, what="panel")
    assert await english.text("#lesson-button") == EN["panel.start_lesson"] == "Start lesson"
    await english.check("en", base)
    # ui.language wins over the browser, both ways.
    main.panel.ui = UiConfig(language="zh-CN")
    forced = await page_in(browser, "en-US", base)
    await until(forced.page, "document.body.dataset.ready === '1'", within=10, what="panel")
    assert await forced.text("#lesson-button") == ZH["panel.start_lesson"]
    await forced.check("zh-CN", base)
    main.panel.ui = UiConfig(language="en")
    forced = await page_in(browser, "zh-CN", base)
    await until(forced.page, "document.body.dataset.ready === '1'", within=10, what="panel")
    assert await forced.text("#lesson-button") == EN["panel.start_lesson"]
    await forced.check("en", base)
    # auto with a language there is no catalogue for: English; Traditional: Chinese.
    main.panel.ui = UiConfig()
    french = await page_in(browser, "fr-FR", main.panel.watch_url())
    assert await french.page.title() == EN["watch.title"]
    taiwan = await page_in(browser, "zh-TW", main.panel.watch_url())
    assert await taiwan.page.title() == ZH["watch.title"]

    # The main classroom's agent dies mid-lesson (no goodbye: the broker publishes its Last
    # Will): the receiving room's kiosk says so, in Chinese.
    # Only the kiosk stays open: a page of the main room would keep offering to watch it
    # while it goes.
    for page in (panel, watch, english, forced, french, taiwan):
        await page.page.context.close()
    await main.host.start_lesson()
    await until(kiosk.page, "document.getElementById('slate').hidden", within=30, what="live")
    conn = main.link._conn
    assert conn is not None
    assert main.link_task is not None
    conn.abort()
    main.link_task.cancel()
    for task in main.tasks:
        task.cancel()
    await until(
        kiosk.page,
        "!document.getElementById('slate').hidden && "
        f"document.getElementById('slate').textContent === {ZH['kiosk.main_offline']!r}",
        within=15,
        what="主讲教室离线 on the kiosk",
    )
    assert await kiosk.text("#join-state") == ZH["kiosk.state.waiting"]
    await kiosk.page.screenshot(path=str(ARTIFACTS / "kiosk-main-offline-zh-CN.png"))
    await kiosk.check("zh-CN", room2.panel.url)


async def check_the_dashboard(browser: Any, mosquitto: BrokerUnderTest) -> None:
    specs, groups = fleet_layout(16, per_school=4, live_every=2)
    fleet = SimFleet(
        mosquitto.broker_config(None),
        specs,
        groups,
        interval_s=1.0,
        offline=0.25,
        alert_rate=0.3,
    )
    server = DashboardServer(
        DashboardConfig(
            broker=mosquitto.broker_config(DASHBOARD),
            port=0,
            health_interval_s=1.0,
            language="zh-CN",
        )
    )
    tasks = [
        asyncio.create_task(server.run(), name="test-i18n-dashboard"),
        asyncio.create_task(fleet.run(), name="test-i18n-fleet"),
    ]
    try:
        async with asyncio.timeout(20):
            await server.wait_ready()
            await fleet.wait_ready()
        # --language zh-CN, an English browser: Chinese.
        page = await page_in(browser, "en-US", server.url, width=1440, height=1000)
        await until(
            page.page,
            # and the panel part's rooms, whose retained states the broker still holds
            f"document.querySelectorAll('tr[data-id]').length >= {len(fleet.rooms)}",
            within=20,
            what="the rooms",
        )
        await until(page.page, "document.querySelector('.chip') !== null", within=20, what="alert")
        await until(
            page.page,
            "document.querySelector('#lessons-body tr') !== null",
            within=20,
            what="lesson",
        )
        assert await page.text("#conn-text") == ZH["dash.conn.live"] == "实时"
        statuses = {ZH[f"dash.status.{s}"] for s in ("online", "offline", "shutdown", "stale")}
        shown = set(
            await page.page.evaluate(
                "() => [...document.querySelectorAll('.st-text')].map((n) => n.textContent)"
            )
        )
        assert shown, shown
        assert shown <= statuses, shown
        assert shown & {ZH["dash.status.offline"], ZH["dash.status.shutdown"]}, shown
        chip = await page.text(".chip b")
        assert chip in (ZH["dash.alert.critical"], ZH["dash.alert.warning"])
        # Times and durations as a Chinese reader writes them (24-hour clock, 秒/分钟).
        assert re.fullmatch(r"更新于 \d{2}:\d{2}:\d{2}", await page.text("#updated"))
        since = await page.page.evaluate(
            "() => [...document.querySelectorAll('.since')].map((n) => n.textContent)"
            ".filter(Boolean)"
        )
        assert since
        assert all(
            re.fullmatch(r"已持续 (≥ )?(\d+ (天|小时) )?\d+ (秒|分钟|小时)", s) for s in since
        ), since
        assert re.fullmatch(r"显示 \d+ / \d+ 间教室", await page.text("#shown"))
        await until(
            page.page,
            "[...document.querySelectorAll('#lessons-body .q-detail')]"
            ".some((n) => n.textContent.includes('帧/秒'))",
            within=15,
            what="a lesson's stream figures",
        )
        detail = await page.page.evaluate(
            "[...document.querySelectorAll('#lessons-body .q-detail')]"
            ".map((n) => n.textContent).find((text) => text.includes('帧/秒'))"
        )
        assert re.fullmatch(r"丢包 [\d.]+% · 延迟 \d+ 毫秒 · \d+ 帧/秒", detail), detail
        await page.page.screenshot(path=str(ARTIFACTS / "dashboard-zh-CN.png"))
        await page.check("zh-CN", server.url)

        server.config = server.config.model_copy(update={"language": "en"})
        english = await page_in(browser, "zh-CN", server.url, width=1440, height=1000)
        await until(
            english.page,
            "document.querySelector('#updated').textContent !== ''",
            within=20,
            what="the English page's first update",
        )
        assert await english.text("#conn-text") == "Live"
        assert re.fullmatch(r"Updated \d{2}:\d{2}:\d{2}\s[AP]M", await english.text("#updated"))
        await english.check("en", server.url)
    finally:
        await close_pages(browser)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def check_that_a_missing_key_is_reported(browser: Any, mosquitto: BrokerUnderTest) -> None:
    # The browser half of the missing-key check, shown to fire: a lookup of a key that no
    # catalogue has marks the page and logs the error Page.check fails on.
    server = DashboardServer(DashboardConfig(broker=mosquitto.broker_config(DASHBOARD), port=0))
    task = asyncio.create_task(server.run(), name="test-i18n-missing")
    try:
        async with asyncio.timeout(20):
            await server.wait_ready()
        page = await page_in(browser, "zh-CN", server.url)
        text = await page.page.evaluate("I18N.t('dash.no_such_key', {})")
        assert text == "dash.no_such_key"
        assert await page.page.evaluate("I18N.t('dash.updated', {})") == "更新于 {time}"
        marked = await page.page.evaluate("document.documentElement.dataset.i18nMissing")
        assert marked == "dash.no_such_key dash.updated{time}"
        assert any("dash.no_such_key" in e for e in page.errors), page.errors
        with pytest.raises(AssertionError, match="missing"):
            await page.check("zh-CN", server.url)
    finally:
        await close_pages(browser)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

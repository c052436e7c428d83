"""The panel in a real browser: Debian's Chromium (headless, Playwright) is the WebRTC peer.

Pressing the page's button starts the lesson; the receiving rooms' tiles then play
moving video (VP8 re-encoded from what the main room decoded), the room's own preview
and the watch page play the shared encoder's H.264 as Chromium's WebRTC stack decodes
it, and a receiving room's kiosk page shows the lesson, then the "waiting" slate when
the lesson ends. "Moving" means the picture's checksum changes while the decoded-frame
counter grows: a frozen frame or a slate fails it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.brokers import BrokerUnderTest
from tests.browsers import ARTIFACTS, chromium, needs_chromium, until
from tests.rooms import MAIN, ROOM2, ROOM3, display_name, room

pytestmark = [pytest.mark.slow, needs_chromium, pytest.mark.timeout(180)]

CHECKSUM = """(selector) => {
  const video = document.querySelector(selector);
  if (!video || video.videoWidth === 0) return null;
  const canvas = document.createElement("canvas");
  canvas.width = 96; canvas.height = 54;
  const g = canvas.getContext("2d");
  g.drawImage(video, 0, 0, 96, 54);
  const data = g.getImageData(0, 0, 96, 54).data;
  let hash = 0;
  for (let i = 0; i < data.length; i += 4) hash = (hash * 31 + data[i] + 7 * data[i + 1]) >>> 0;
  return [hash, video.getVideoPlaybackQuality().totalVideoFrames, video.videoWidth];
}"""


async def moving(page: Any, selector: str, *, within: float = 30.0) -> int:
    """Wait until ``selector``'s video shows changing pictures; its decoded width."""
    await until(
        page,
        f"(() => {{ const v = document.querySelector({selector!r}); "
        "return v && v.videoWidth > 0 && v.getVideoPlaybackQuality().totalVideoFrames > 5; })()",
        within=within,
        what=f"video in {selector}",
    )
    first = await page.evaluate(CHECKSUM, selector)
    changes = 0
    for _ in range(40):
        await page.wait_for_timeout(150)
        now = await page.evaluate(CHECKSUM, selector)
        if now is not None and now[0] != first[0] and now[1] > first[1]:
            changes += 1
            if changes >= 3:
                return int(now[2])
            first = now
    pytest.fail(f"the video in {selector} is not moving (frames {first})")


async def test_the_button_and_the_tiles_in_chromium(mosquitto: BrokerUnderTest) -> None:
    async with (
        room(mosquitto, MAIN, main=True, panel=True) as main,
        room(mosquitto, ROOM2, panel=True) as room2,
        room(mosquitto, ROOM3) as _room3,
        chromium() as browser,
    ):
        assert main.panel is not None
        assert room2.panel is not None
        errors: list[str] = []
        urls: list[str] = []
        panel = await browser.new_page(viewport={"width": 1280, "height": 900})
        panel.on("pageerror", lambda exc: errors.append(str(exc)))
        panel.on("request", lambda request: urls.append(request.url))
        await panel.goto(main.panel.url)
        await until(panel, "document.body.dataset.ready === '1'", within=10, what="the panel")
        assert await panel.inner_text("#lesson-button") == "Start lesson"

        kiosk = await browser.new_page(viewport={"width": 1280, "height": 800})
        kiosk.on("pageerror", lambda exc: errors.append(str(exc)))
        await kiosk.goto(room2.panel.url)
        await until(
            kiosk,
            "document.getElementById('slate').textContent.includes('Waiting')",
            within=10,
            what="the waiting slate",
        )

        # One button.
        await panel.click("#lesson-button")
        await until(
            panel,
            "document.getElementById('lesson-button').textContent === 'End lesson'",
            within=15,
            what="the lesson started",
        )
        for device in (ROOM2, ROOM3):
            await until(
                panel,
                f"document.querySelector('.tile[data-room=\"{device}\"]')?.dataset.state "
                "=== 'live'",
                within=30,
                what=f"{device} live",
            )
            name = f'.tile[data-room="{device}"] .name'
            assert await panel.inner_text(name) == display_name(device)
            width = await moving(panel, f'.tile[data-room="{device}"] video')
            assert width == 320  # the room's 320x240 camera, at tile size
        # The room's own picture: the shared encoder's H.264, decoded by Chromium.
        assert await moving(panel, "#self-video") == 320

        # The receiving room's kiosk: the lesson, no slate.
        await moving(kiosk, "#lesson-video")
        await until(kiosk, "document.getElementById('slate').hidden", within=10, what="no slate")
        ARTIFACTS.mkdir(exist_ok=True)
        await panel.screenshot(path=str(ARTIFACTS / "panel.png"))
        await kiosk.screenshot(path=str(ARTIFACTS / "kiosk.png"))

        # The watch page, with the token from its URL fragment.
        watch = await browser.new_page()
        watch.on("pageerror", lambda exc: errors.append(str(exc)))
        await watch.goto(main.panel.watch_url())
        assert await moving(watch, "#watch-video") == 320

        # End, with a presenter clicker's "blank screen" key: one press only warns...
        await panel.keyboard.press("b")
        await until(
            panel,
            "document.getElementById('message').textContent.includes('again')",
            within=5,
            what="the warning",
        )
        assert main.host.lesson is not None
        # ...the second one ends the lesson, and the kiosk says it is waiting again.
        await panel.keyboard.press("b")
        deadline = time.monotonic() + 20
        while main.host.lesson is not None:  # the end request is on its way (loaded CI)
            assert time.monotonic() < deadline, "the second press did not end the lesson"
            await asyncio.sleep(0.05)
        await until(
            kiosk,
            "!document.getElementById('slate').hidden && "
            "document.getElementById('slate').textContent.includes('Waiting')",
            within=20,
            what="the waiting slate after the end",
        )
        assert not errors, errors
        assert all(u.startswith(main.panel.url) for u in urls), urls

"""The teacher panel's local API and `classroom-agent lesson`, against real rooms.

Rooms are real (tests/rooms.py: MqttLink on a real Mosquitto, synthetic hubs, the
stream service, the panel on a free loopback port); requests are real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from agent.panel import PanelServer, load_or_create_token
from agent.panel.cli import describe_status
from agent.stream import JoinState
from tests.brokers import BrokerUnderTest, eventually, observing
from tests.rooms import (
    GROUP,
    MAIN,
    PANEL_TOKEN,
    ROOM2,
    ROOM3,
    display_name,
    panel_request,
    room,
    until_live,
)

REPO = Path(__file__).resolve().parents[1]


async def call(
    panel: PanelServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    return await panel_request(panel.url, method, path, body, headers=headers, raw=raw)


async def test_the_button_starts_and_ends_the_lesson(mosquitto: BrokerUnderTest) -> None:
    lesson_topic = f"{mosquitto.prefix}/lesson/{GROUP}"
    async with (
        observing(mosquitto, lesson_topic) as observer,
        room(mosquitto, MAIN, main=True, panel=True) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        assert main.panel is not None
        status, before = await call(main.panel, "GET", "/api/status")
        assert status == 200
        assert before["device"] == MAIN
        assert before["hosting"][0]["lesson"] is None
        assert before["joining"] is None

        status, started = await call(main.panel, "POST", "/api/lesson/start", {"subject": "Music"})
        assert status == 200, started
        assert started["group"] == GROUP
        announced = await observer.wait_for(lesson_topic, lambda m: bool(m.payload))
        assert json.loads(announced.payload)["lesson_id"] == started["lesson_id"]
        await until_live(room2)

        async def room2_live() -> bool:
            _, now = await call(main.panel, "GET", "/api/status")
            return now["hosting"][0]["rooms"].get(ROOM2, {}).get("state") == "live"

        for _ in range(200):
            if await room2_live():
                break
            await asyncio.sleep(0.1)
        _, during = await call(main.panel, "GET", "/api/status")
        rooms = during["hosting"][0]["rooms"]
        assert rooms[ROOM2]["state"] == "live"
        assert rooms[ROOM2]["name"] == display_name(ROOM2)  # from its retained state
        assert rooms[ROOM3]["state"] == "joining"  # expected, never came
        assert during["hosting"][0]["lesson"]["subject"] == "Music"
        text = describe_status(during)
        assert ROOM2 in text
        assert "live" in text

        # A double press returns the same lesson.
        _, again = await call(main.panel, "POST", "/api/lesson/start", {})
        assert again["lesson_id"] == started["lesson_id"]

        status, ended = await call(main.panel, "POST", "/api/lesson/end", {})
        assert status == 200, ended
        await observer.wait_for(lesson_topic, lambda m: m.payload == b"")
        await eventually(lambda: room2.joiner.state is JoinState.WAITING, within=15)


async def test_bad_requests_are_refused_with_the_field_named(mosquitto: BrokerUnderTest) -> None:
    async with room(mosquitto, MAIN, main=True, panel=True) as main:
        panel = main.panel
        assert panel is not None
        status, body = await call(panel, "POST", "/api/lesson/start", {"subjekt": "x"})
        assert status == 400
        assert "subjekt" in body["error"]
        assert "unknown field" in body["error"]
        status, body = await call(panel, "POST", "/api/lesson/start", {"group": "maths"})
        assert status == 404
        assert "maths" in body["error"]
        status, body = await call(panel, "POST", "/api/lesson/start", raw=b"{nope")
        assert status == 400
        assert "JSON" in body["error"]
        status, body = await call(panel, "POST", "/api/controls", {"camera_muted": "yes"})
        assert status == 400
        assert "camera_muted" in body["error"]
        status, body = await call(
            panel, "POST", "/api/lesson/start", {}, headers={"Content-Type": "text/plain"}
        )
        assert status == 415
        status, body = await call(
            panel, "POST", "/api/lesson/start", {}, headers={"Origin": "http://evil.example"}
        )
        assert status == 403
        status, body = await call(panel, "POST", "/api/hand", {"up": True})
        assert status == 409
        assert "receiving room" in body["error"]
        offer = "v=0\r\n" + "a=x\r\n" * 4
        status, body = await call(panel, "POST", "/api/view", {"source": "camera", "sdp": offer})
        assert status == 400
        assert "source" in body["error"]
        status, body = await call(
            panel, "POST", "/api/view", {"source": "room:school7.room7", "sdp": offer}
        )
        assert status == 404
        assert "school7.room7" in body["error"]
        status, body = await call(panel, "POST", "/api/view", {"source": "lesson", "sdp": offer})
        assert status == 400
        assert "offer" in body["error"]
        # Nothing above started a lesson.
        assert main.host.lesson is None
        # DNS rebinding: a foreign Host name gets nothing.
        async with (
            aiohttp.ClientSession() as session,
            session.get(panel.url + "api/status", headers={"Host": "evil.example"}) as reply,
        ):
            assert reply.status == 421


async def test_mute_and_hands(mosquitto: BrokerUnderTest) -> None:
    async with (
        room(mosquitto, MAIN, main=True, panel=True) as main,
        room(mosquitto, ROOM2, panel=True) as room2,
    ):
        assert main.panel is not None
        assert room2.panel is not None
        status, body = await call(main.panel, "POST", "/api/controls", {"microphone_muted": True})
        assert status == 200
        assert body["controls"]["microphone_muted"] is True
        assert main.service.controls.microphone_muted
        status, body = await call(room2.panel, "POST", "/api/hand", {"up": True})
        assert status == 409
        assert "no lesson" in body["error"]

        await call(main.panel, "POST", "/api/lesson/start", {})
        await until_live(room2)
        status, body = await call(room2.panel, "POST", "/api/hand", {"up": True})
        assert status == 200
        assert body["hand_up"] is True

        async def hand_at_main() -> bool:
            _, now = await call(main.panel, "GET", "/api/status")
            return bool(now["hosting"][0]["rooms"].get(ROOM2, {}).get("hand_up"))

        for _ in range(100):
            if await hand_at_main():
                break
            await asyncio.sleep(0.1)
        assert await hand_at_main()
        status, _ = await call(main.panel, "POST", "/api/hand/lower", {"room": ROOM2})
        assert status == 200
        assert not await hand_at_main()
        _, kiosk = await call(room2.panel, "GET", "/api/status")
        assert kiosk["joining"]["state"] == "live"
        assert kiosk["joining"]["lesson"]["main"] == MAIN


def test_other_hosts_need_the_token() -> None:
    """The authorisation rule itself, for a request from a non-loopback address."""
    server = PanelServer.__new__(PanelServer)
    server._token = PANEL_TOKEN

    class Transport:
        def __init__(self, peer: str) -> None:
            self.peer = peer

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return (self.peer, 50000) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    async def handler(request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"ok": True})

    async def ask(peer: str, token: str | None) -> int:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        request = make_mocked_request(
            "GET", "/api/status", headers=headers, transport=Transport(peer)
        )
        response = await server._authorise(request, handler)
        return response.status

    async def scenario() -> None:
        assert await ask("127.0.0.1", None) == 200
        assert await ask("::1", None) == 200
        assert await ask("10.1.2.3", None) == 401
        assert await ask("10.1.2.3", "wrong-token-wrong-token") == 401
        assert await ask("10.1.2.3", PANEL_TOKEN) == 200

    asyncio.run(scenario())


def test_token_is_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "panel-token"
    token = load_or_create_token(path)
    assert len(token) >= 24
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_token(path) == token
    path.write_text("short\n")
    assert load_or_create_token(path) != "short"


async def lesson_cli(url: str, *args: str) -> tuple[int, str, str]:
    """``classroom-agent lesson --url URL ARGS...`` in a child process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "lesson",
        "--url",
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_lesson_command_line(mosquitto: BrokerUnderTest) -> None:
    async with (
        room(mosquitto, MAIN, main=True, panel=True) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        assert main.panel is not None
        url = main.panel.url

        async def cli(*args: str) -> tuple[int, str, str]:
            return await lesson_cli(url, *args)

        code, out, err = await cli("start", "--subject", "Songs")
        assert code == 0, err
        assert "started" in out
        await until_live(room2)
        code, out, err = await cli("status")
        assert code == 0, err
        assert "Songs" in out
        assert ROOM2 in out
        code, out, err = await cli("--json", "status")
        assert json.loads(out)["hosting"][0]["lesson"]["subject"] == "Songs"
        code, out, err = await cli("start", "--group", "maths")
        assert code == 2
        assert "maths" in err
        code, out, err = await cli("end")
        assert code == 0, err
        assert "ended" in out
        assert main.host.lesson is None

    # No agent at the URL: a clear message, exit 1.
    code, _, err = await lesson_cli("http://127.0.0.1:9/", "status")
    assert code == 1
    assert "is classroom-agent running" in err

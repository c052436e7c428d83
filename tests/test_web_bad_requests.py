"""Malformed requests to the panel and the dashboard: refused, one warning line, no
traceback (issue 12, point 3).

Raw sockets against the real servers (a panel of a main room, a dashboard as the
``dashboard`` user), both on a real Mosquitto: aiohttp's own parser meets requests no
HTTP client library would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from aiohttp import web

from agent.dashboard import DashboardConfig
from agent.dashboard.server import DashboardServer
from agent.logs import RejectionLog
from agent.web import LOOPBACK_NAMES, guard, request_logger
from tests.brokers import DASHBOARD, BrokerUnderTest
from tests.rooms import MAIN, room

BAD_REQUESTS = {
    "empty Host": b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\nUser-Agent: raw\r\n\r\n",
    "garbage request line": b"\x16\x03\x01\x02\x00 garbage\r\n\r\n",
    "no Host, HTTP/1.1 POST": b"POST /api/start HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
}
BURST = 5  # each kind, back to back


async def raw_request(port: int, request: bytes) -> int:
    """Send ``request`` as it is; the HTTP status of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    parts = status_line.split()
    assert len(parts) >= 2, status_line
    assert parts[0].startswith(b"HTTP/"), status_line
    return int(parts[1])


async def burst(port: int) -> dict[str, set[int]]:
    statuses: dict[str, set[int]] = {}
    for _ in range(BURST):
        for kind, request in BAD_REQUESTS.items():
            statuses.setdefault(kind, set()).add(await raw_request(port, request))
    return statuses


async def refused_with_one_warning(
    port: int, caplog: pytest.LogCaptureFixture, rejections: RejectionLog, logger: str
) -> None:
    """A burst of every bad request: each refused (400/421), one warning in all."""
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    caplog.set_level(logging.DEBUG, logger=logger)
    statuses = await burst(port)
    for kind, seen in statuses.items():
        assert seen <= {400, 421}, (kind, seen)
    check_logged_once(caplog, rejections)


def check_logged_once(caplog: pytest.LogCaptureFixture, rejections: RejectionLog) -> None:
    records = caplog.records
    assert not [r for r in records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in records if r.levelno >= logging.ERROR
    ]
    assert not [r for r in records if r.exc_info or "Traceback" in r.getMessage()]
    warnings = [
        r for r in records if r.levelno == logging.WARNING and "bad request" in r.getMessage()
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "\n" not in warnings[0].getMessage()
    assert rejections.logged == 1
    assert rejections.suppressed == BURST * len(BAD_REQUESTS) - 1


async def test_the_panel_refuses_malformed_requests_with_one_warning(
    mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    async with room(mosquitto, MAIN, main=True, panel=True) as main:
        panel = main.panel
        assert panel is not None
        port = int(panel.url.rstrip("/").rsplit(":", 1)[1])
        await refused_with_one_warning(port, caplog, panel.bad_requests, "agent.panel")
        # A good request still gets through (and logs nothing).
        request = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        assert await raw_request(port, request) in (200, 401)


async def test_the_dashboard_refuses_malformed_requests_with_one_warning(
    mosquitto: BrokerUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    config = DashboardConfig(broker=mosquitto.broker_config(DASHBOARD), port=0)
    server = DashboardServer(config)
    task = asyncio.create_task(server.run(), name="test-dashboard")
    try:
        async with asyncio.timeout(20):
            await server.wait_ready()
        port = int(server.url.rstrip("/").rsplit(":", 1)[1])
        await refused_with_one_warning(port, caplog, server.bad_requests, "agent.dashboard")
        request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        assert await raw_request(port, request) == 200
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_handlers_own_crash_still_logs_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only malformed requests are turned into warnings: a bug is still an ERROR."""

    async def broken(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug in a handler")

    rejections = RejectionLog(logging.getLogger(__name__), "bad request")
    app = web.Application(middlewares=[guard(LOOPBACK_NAMES, rejections)])
    app.router.add_get("/", broken)
    runner = web.AppRunner(
        app, access_log=None, logger=request_logger(rejections), handle_signals=False
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        caplog.set_level(logging.DEBUG, logger="aiohttp")
        request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        assert await raw_request(port, request) == 500
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert errors[0].exc_info is not None
        assert errors[0].pathname.endswith("web_protocol.py")  # aiohttp's line, not ours
        assert rejections.logged == 0
    finally:
        await runner.cleanup()

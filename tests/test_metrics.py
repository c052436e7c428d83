"""Prometheus metrics: the text exposition, and a real HTTP GET against the server."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agent.config.models import IdentityConfig
from agent.health.prometheus import CONTENT_TYPE, MetricsServer, escape_label_value, render_metrics
from tests.test_discovery import sample_health

IDENTITY = IdentityConfig(site="school1", room="room1")
LABELS = 'device="school1.room1",site="school1",room="room1"'
# name{labels} value: the only sample line shape the text format allows
SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? -?[0-9.e+-]+$'
)


def parse(text: str) -> dict[str, float]:
    """``{'name{labels}': value}``; fails on any line the text format would refuse."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("gauge", "counter")
            assert name not in typed, f"{name} typed twice"
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        assert SAMPLE.match(line), f"not a valid sample line: {line!r}"
        key, value = line.rsplit(" ", 1)
        assert key.split("{")[0] in typed, f"{key}: sample before its TYPE line"
        assert key not in samples, f"{key} twice"
        samples[key] = float(value)
    return samples


def test_exposition_of_a_health_message() -> None:
    labels = {"device": "school1.room1", "site": "school1", "room": "room1"}
    samples = parse(render_metrics(sample_health(), labels))
    assert samples[f"classroom_health_available{{{LABELS}}}"] == 1
    assert samples[f"classroom_camera_up{{{LABELS}}}"] == 1
    assert samples[f'classroom_camera_state{{{LABELS},state="ok"}}'] == 1
    assert samples[f'classroom_camera_state{{{LABELS},state="lost"}}'] == 0
    assert samples[f"classroom_video_fps{{{LABELS}}}"] == 29.9
    assert samples[f"classroom_mic_level_dbfs{{{LABELS}}}"] == -23.5
    assert samples[f"classroom_cpu_percent{{{LABELS}}}"] == 23.5
    assert samples[f"classroom_disk_percent{{{LABELS}}}"] == 37.2
    assert samples[f"classroom_disk_free_bytes{{{LABELS}}}"] == 80123 * 2**20
    assert samples[f"classroom_temperature_celsius{{{LABELS}}}"] == 51
    assert samples[f"classroom_clock_synced{{{LABELS}}}"] == 1
    assert samples[f"classroom_broker_connected{{{LABELS}}}"] == 1
    assert samples[f"classroom_broker_publish_rtt_seconds{{{LABELS}}}"] == pytest.approx(0.0042)
    assert samples[f"classroom_alerts_active{{{LABELS}}}"] == 1
    assert f'classroom_alert_since_seconds{{{LABELS},rule="disk_full",severity="warning"}}' in (
        samples
    )
    assert samples[f'classroom_service_up{{{LABELS},service="mqtt"}}'] == 1
    assert samples[f'classroom_agent_info{{{LABELS},version="0.1.0",profile="virtual"}}'] == 1
    assert 0 <= samples[f"classroom_health_age_seconds{{{LABELS}}}"] < 60


def test_missing_and_null_fields_are_left_out() -> None:
    health = sample_health()
    health["system"]["temperature_c"] = None  # no sensors on this machine
    health["capture"]["video"]["state"] = "lost"
    del health["mqtt"]
    samples = parse(render_metrics(health, {"device": "d"}))
    assert not any(key.startswith("classroom_temperature_celsius") for key in samples)
    assert not any(key.startswith("classroom_broker_") for key in samples)
    assert samples['classroom_camera_up{device="d"}'] == 0
    assert samples['classroom_camera_state{device="d",state="lost"}'] == 1
    # Before the first health message only availability is served.
    assert parse(render_metrics(None, {"device": "d"})) == {
        'classroom_health_available{device="d"}': 0
    }


def test_label_values_are_escaped() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    health = sample_health()
    health["agent"]["services"] = {'odd "name"\\\n': "backoff"}
    text = render_metrics(health, {"device": "x"})
    samples = parse(text)
    assert samples['classroom_service_up{device="x",service="odd \\"name\\"\\\\\\n"}'] == 0


@contextlib.asynccontextmanager
async def serving(server: MetricsServer) -> AsyncIterator[None]:
    task = asyncio.create_task(server.run(), name="test-metrics")
    try:
        ready = asyncio.ensure_future(server.wait_ready())
        done, _ = await asyncio.wait({ready, task}, timeout=10, return_when="FIRST_COMPLETED")
        if ready not in done:
            ready.cancel()
            if task.done():
                task.result()  # raises the server's error
            pytest.fail("metrics server did not start within 10 s")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_http_get_metrics() -> None:
    health: dict[str, Any] | None = None
    server = MetricsServer(lambda: health, IDENTITY, port=0)
    async with serving(server), aiohttp.ClientSession() as session:
        assert server.bound_port
        assert server.url == f"http://127.0.0.1:{server.bound_port}/metrics"
        async with session.get(server.url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            first = parse(await response.text())
        assert first == {f"classroom_health_available{{{LABELS}}}": 0}

        health = sample_health()
        async with session.get(server.url) as response:
            samples = parse(await response.text())
        assert samples[f"classroom_camera_up{{{LABELS}}}"] == 1
        assert samples[f"classroom_mic_level_dbfs{{{LABELS}}}"] == -23.5

        async with session.get(server.url.replace("/metrics", "/other")) as response:
            assert response.status == 404
        assert server.scrapes == 2
    assert server.bound_port is None  # stopped and closed


async def test_a_broken_snapshot_is_a_500_not_a_crash() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("no snapshot")

    server = MetricsServer(broken, IDENTITY, port=0)
    async with serving(server), aiohttp.ClientSession() as session:
        async with session.get(server.url) as response:
            assert response.status == 500
        async with session.get(server.url) as response:  # and it keeps serving
            assert response.status == 500


async def test_port_in_use_names_the_setting() -> None:
    first = MetricsServer(lambda: None, IDENTITY, port=0)
    async with serving(first):
        assert first.bound_port is not None
        second = MetricsServer(lambda: None, IDENTITY, port=first.bound_port)
        with pytest.raises(OSError, match=r"health.metrics_port: cannot listen on 127.0.0.1:"):
            await asyncio.wait_for(second.run(), 10)

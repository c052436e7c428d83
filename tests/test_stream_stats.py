"""Per-peer RTP figures: pure snapshot/delta arithmetic, then a live lesson on loopback."""

from __future__ import annotations

import datetime
import json
from typing import Any

import jsonschema
import pytest
from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCStatsReport,
    RTCTransportStats,
)

from agent.stream.stats import (
    Figures,
    StatsSnapshot,
    figures,
    inbound_loss_percent,
    jitter_ms,
    snapshot,
)
from tests.brokers import BrokerUnderTest, eventually
from tests.test_stream_lesson import MAIN, ROOM2, ROOT, frames_advance, room, until_live

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def report(
    *,
    kind: str = "video",
    rtt: float | None = 0.035,
    fraction_lost: int = 0,
    remote_jitter: int = 90,
    received: int = 1000,
    lost: int = 0,
    jitter: int = 450,
    sent: int = 500_000,
    transport_rx: int = 300_000,
) -> RTCStatsReport:
    r = RTCStatsReport()
    common: dict[str, Any] = {"timestamp": NOW, "ssrc": 1, "kind": kind, "transportId": "t"}
    r.add(
        RTCRemoteInboundRtpStreamStats(
            type="remote-inbound-rtp",
            id="ri",
            packetsReceived=0,
            packetsLost=0,
            jitter=remote_jitter,
            roundTripTime=rtt,  # type: ignore[arg-type]
            fractionLost=fraction_lost,
            **common,
        )
    )
    r.add(
        RTCInboundRtpStreamStats(
            type="inbound-rtp",
            id="in",
            packetsReceived=received,
            packetsLost=lost,
            jitter=jitter,
            **common,
        )
    )
    r.add(
        RTCOutboundRtpStreamStats(
            type="outbound-rtp", id="out", packetsSent=0, bytesSent=sent, trackId="x", **common
        )
    )
    r.add(
        RTCTransportStats(
            timestamp=NOW,
            type="transport",
            id="t",
            packetsSent=0,
            packetsReceived=0,
            bytesSent=0,
            bytesReceived=transport_rx,
            iceRole="controlling",
            dtlsState="connected",
        )
    )
    return r


def test_snapshot_reads_video_and_transport_counters() -> None:
    snap = snapshot(report(), at=10.0, frames_received=7)
    assert snap == StatsSnapshot(
        at=10.0,
        rtt_s=0.035,
        remote_fraction_lost=0,
        remote_jitter=90,
        packets_received=1000,
        packets_lost=0,
        jitter=450,
        bytes_sent=500_000,
        bytes_received=300_000,
        frames_received=7,
    )


def test_snapshot_ignores_audio_streams_but_keeps_the_transport() -> None:
    snap = snapshot(report(kind="audio"), at=1.0)
    assert snap == StatsSnapshot(at=1.0, bytes_received=300_000)
    assert figures(None, snap) == Figures()


def test_figures_from_two_snapshots_sender_side() -> None:
    prev = snapshot(report(sent=500_000, received=1000, lost=0), at=10.0, frames_received=0)
    cur = snapshot(
        report(sent=600_000, received=1090, lost=10, fraction_lost=0, rtt=0.0123),
        at=12.0,
        frames_received=30,
    )
    got = figures(prev, cur, "sent")
    assert got.rtt_ms == 12.3
    assert got.loss_percent == 10.0  # 10 lost of 100 expected in the interval
    assert got.jitter_ms == 5.0  # 450 RTP units at 90 kHz
    assert got.bitrate_kbps == 400.0  # 100 kB in 2 s
    assert got.fps == 15.0


def test_receiver_side_bitrate_is_the_transport_bytes_received() -> None:
    prev = snapshot(report(transport_rx=0), at=0.0)
    cur = snapshot(report(transport_rx=125_000), at=4.0)
    assert figures(prev, cur, "received").bitrate_kbps == 250.0
    # A "sent" session that sends no video measures what it receives.
    no_video_out = RTCStatsReport(
        {k: v for k, v in report(transport_rx=125_000).items() if k != "out"}
    )
    cur2 = snapshot(no_video_out, at=4.0)
    prev2 = StatsSnapshot(at=0.0, bytes_received=0)
    assert figures(prev2, cur2, "sent").bitrate_kbps == 250.0


def test_loss_is_the_worse_direction_and_fraction_lost_is_eighth_bit_fixed_point() -> None:
    cur = snapshot(report(fraction_lost=64, received=1000, lost=0), at=1.0)
    assert figures(None, cur).loss_percent == 25.0  # 64/256 as the peer reports ours
    cur = snapshot(report(fraction_lost=0, received=990, lost=10), at=1.0)
    assert figures(None, cur).loss_percent == 1.0  # cumulative without a previous sample


def test_first_sample_has_no_rates_and_counter_resets_give_none() -> None:
    cur = snapshot(report(), at=1.0, frames_received=5)
    first = figures(None, cur)
    assert first.bitrate_kbps is None
    assert first.fps is None
    assert first.rtt_ms == 35.0
    assert first.loss_percent == 0.0
    later = snapshot(report(sent=1000), at=3.0, frames_received=1)  # went backwards
    assert figures(cur, later).bitrate_kbps is None
    assert figures(cur, later).fps is None


def test_rtt_unknown_until_the_first_receiver_report() -> None:
    assert figures(None, snapshot(report(rtt=None), at=0.0)).rtt_ms is None


def test_inbound_loss_edge_cases() -> None:
    assert inbound_loss_percent(None, StatsSnapshot(at=0.0)) is None
    idle = StatsSnapshot(at=0.0, packets_received=5, packets_lost=0)
    assert inbound_loss_percent(idle, idle) is None  # nothing expected in the interval
    dup = StatsSnapshot(at=1.0, packets_received=15, packets_lost=-1)
    assert inbound_loss_percent(idle, dup) == 0.0
    assert jitter_ms(None) is None
    assert jitter_ms(8000, clock_hz=8000) == 1000.0


def test_figures_round_to_one_decimal() -> None:
    prev = StatsSnapshot(at=0.0, bytes_sent=0, frames_received=0)
    cur = StatsSnapshot(at=3.0, bytes_sent=1001, frames_received=44, rtt_s=0.012345, jitter=1)
    got = figures(prev, cur)
    assert got == Figures(rtt_ms=12.3, jitter_ms=0.0, bitrate_kbps=2.7, fps=14.7)


@pytest.mark.slow
async def test_live_lesson_reports_rtp_figures(
    mosquitto: BrokerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.stream.peer import PeerSession

    monkeypatch.setattr(PeerSession, "stats_interval_s", 1.0)
    schema = json.loads((ROOT / "schemas" / "health.v1.json").read_text())
    async with (
        room(mosquitto, MAIN, main=True) as main,
        room(mosquitto, ROOM2) as room2,
    ):
        await main.host.start_lesson("Music, grade 5")
        await until_live(room2)
        await frames_advance(room2.probe, MAIN, by=15)
        await frames_advance(main.probe, ROOM2, by=10)

        def peer(r: Any, remote: str) -> dict[str, Any]:
            return dict(r.service.stats()["peers"].get(remote) or {})

        await eventually(
            lambda: (
                isinstance(peer(main, ROOM2).get("rtt_ms"), float)
                and (peer(main, ROOM2).get("bitrate_kbps") or 0) > 0
                and (peer(room2, MAIN).get("bitrate_kbps") or 0) > 0
            ),
            within=20,
            what="RTP figures for both ends",
        )
        host_view, room_view = peer(main, ROOM2), peer(room2, MAIN)
        assert host_view["rtt_ms"] >= 0
        assert host_view["loss_percent"] >= 0
        assert host_view["jitter_ms"] >= 0
        assert host_view["fps"] > 0  # main receives room2's video back
        assert room_view["loss_percent"] >= 0
        assert room_view["fps"] > 0
        for section in (main.service.stats(), room2.service.stats()):
            jsonschema.validate(section, schema["properties"]["stream"])
        print("main sees", host_view, "room2 sees", room_view)

        await main.host.end_lesson()
        await eventually(lambda: not main.host.sessions(), within=15, what="sessions gone")

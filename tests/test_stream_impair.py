"""The user-space link impairment (agent/testkit/impair.py) on real loopback sockets.

The rig: an aioice ``StunProtocol`` (the hooked class) on one UDP socket and a plain
asyncio echo server (not aioice, so not impaired) on another. A datagram from the
protocol to the echo crosses the shim outbound, its echo crosses it inbound: the round
trip is the one-ended ``delay_ms`` convention the bench relies on. Seeds are fixed, so
the loss figures are repeatable; the bounds are still wide enough for any seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import aioice.ice
import pytest
from aioice import Candidate
from aiortc import RTCSessionDescription

from agent.capture import FrameHub, open_video_source
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import EncoderSettings, SharedH264Encoder, route_keyframe_requests
from agent.stream.ice import gather, new_peer_connection
from agent.stream.peer import h264_preferences
from agent.stream.sinks import ProbeSink
from agent.testkit.impair import ImpairmentUnavailable, LinkImpairment, impaired
from tests.brokers import eventually

LOOPBACK = "127.0.0.1"
HEADER = struct.Struct("!Id")  # sequence number, send time (monotonic)


@dataclass
class Echo(asyncio.DatagramProtocol):
    """Sends every datagram back, noting what arrived and when."""

    # seq, arrival time, size, send time (monotonic)
    arrivals: list[tuple[int, float, int, float]] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        seq, sent = HEADER.unpack_from(data)
        self.arrivals.append((seq, time.monotonic(), len(data), sent))
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Receiver:
    """Stands in for the aioice Connection behind the protocol: collects echoes."""

    def __init__(self) -> None:
        self.echoes: dict[int, float] = {}  # seq -> round trip (s)
        self.rtt_waiters: dict[int, asyncio.Future[float]] = {}

    def data_received(self, data: bytes, component: int) -> None:
        seq, sent = HEADER.unpack_from(data)
        rtt = time.monotonic() - sent
        self.echoes[seq] = rtt
        waiter = self.rtt_waiters.pop(seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(rtt)

    def protocol_lost(self, protocol: Any) -> None:
        pass


@dataclass
class Rig:
    protocol: aioice.ice.StunProtocol
    receiver: Receiver
    echo: Echo
    echo_addr: tuple[str, int]

    async def send(self, seq: int, size: int = 64) -> None:
        payload = HEADER.pack(seq, time.monotonic()).ljust(size, b"\0")
        await self.protocol.send_data(payload, self.echo_addr)

    async def ping(self, seq: int, within: float = 5.0) -> float:
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.receiver.rtt_waiters[seq] = waiter
        await self.send(seq)
        async with asyncio.timeout(within):
            return await waiter


@contextlib.asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    echo_transport, echo = await loop.create_datagram_endpoint(Echo, local_addr=(LOOPBACK, 0))
    receiver = Receiver()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: aioice.ice.StunProtocol(receiver),  # type: ignore[arg-type]
        local_addr=(LOOPBACK, 0),
    )
    port = transport.get_extra_info("sockname")[1]
    protocol.local_candidate = Candidate(
        foundation="1", component=1, transport="udp", priority=1, host=LOOPBACK, port=port,
        type="host",
    )  # fmt: skip
    try:
        yield Rig(protocol, receiver, echo, echo_transport.get_extra_info("sockname"))
    finally:
        await protocol.close()
        echo_transport.close()


# -- the settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": 10, "jitter_ms": 20}, "jitter_ms"),
        ({"delay_ms": 10, "loss": 1.0}, "loss"),
        ({"delay_ms": 10, "loss": -0.1}, "loss"),
        ({"delay_ms": 10, "rate_kbps": 0}, "rate_kbps"),
        ({"delay_ms": 10, "queue_ms": 0}, "queue_ms"),
        ({"delay_ms": float("nan")}, "delay_ms"),
        ({"delay_ms": 10, "loss_burst": 0.5}, "loss_burst"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LinkImpairment(**kwargs)


def test_hooks_are_restored_and_activation_is_not_reentrant() -> None:
    before = {n: aioice.ice.StunProtocol.__dict__[n] for n in ("datagram_received", "send_data")}
    with impaired(LinkImpairment(delay_ms=10)):
        assert aioice.ice.StunProtocol.__dict__["send_data"] is not before["send_data"]
        with pytest.raises(RuntimeError, match="already active"), impaired(LinkImpairment(1)):
            pass
    after = {n: aioice.ice.StunProtocol.__dict__[n] for n in ("datagram_received", "send_data")}
    assert after == before


def test_a_missing_hook_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aioice.ice.StunProtocol, "send_stun")
    with pytest.raises(ImpairmentUnavailable, match="send_stun"), impaired(LinkImpairment(1)):
        pass


def test_a_reshaped_hook_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    async def send_data(self: Any, data: bytes, addr: tuple[str, int], flags: int = 0) -> None:
        pass

    monkeypatch.setattr(aioice.ice.StunProtocol, "send_data", send_data)
    with pytest.raises(ImpairmentUnavailable, match="send_data"), impaired(LinkImpairment(1)):
        pass


# -- the link on real sockets ---------------------------------------------------------------


async def test_round_trip_to_an_unimpaired_peer_is_the_configured_delay() -> None:
    async with rig() as r:
        plain = [await r.ping(seq) for seq in range(5)]
        with impaired(LinkImpairment(delay_ms=60, seed=1)) as link:
            rtts = [await r.ping(seq) for seq in range(100, 120)]
        assert link.outbound.delayed == link.inbound.delayed == 20
    assert max(plain) < 0.05
    rtts.sort()
    assert rtts[0] >= 0.059, rtts  # half out, half in: never early
    assert rtts[len(rtts) // 2] < 0.060 + 0.030, rtts  # loaded 2-core runners are late


async def test_jitter_spreads_the_delay_without_reordering() -> None:
    async with rig() as r:
        with impaired(LinkImpairment(delay_ms=80, jitter_ms=40, seed=2)):
            rtts = sorted([await r.ping(seq) for seq in range(30)])
            for seq in range(100, 300):  # back to back: jitter must not reorder them
                await r.send(seq)
            await eventually(lambda: len(r.receiver.echoes) == 230, within=10, what="echoes")
    order = [seq for seq, *_ in r.echo.arrivals]
    assert order == sorted(order)  # a late packet holds back the ones behind it
    assert rtts[0] >= 0.059, rtts  # 80 - 40 / 2 (uniform, half each way)
    assert rtts[-1] - rtts[0] > 0.015, rtts  # it does spread


async def test_loss_is_close_to_the_configured_rate_each_way() -> None:
    count = 2000
    async with rig() as r:
        with impaired(LinkImpairment(delay_ms=0, loss=0.1, seed=3)) as link:
            for seq in range(count):
                await r.send(seq)
                if seq % 100 == 99:  # stay far below the socket buffers
                    await eventually(
                        lambda: len(r.echo.arrivals) == link.outbound.sent, what="echoes"
                    )
            await eventually(
                lambda: len(r.receiver.echoes) == link.inbound.sent, what="the last echoes"
            )
    out, back = link.outbound, link.inbound
    assert out.offered == count
    assert back.offered == len(r.echo.arrivals) == out.sent
    # Binomial(2000, 0.1): sd 13.4; +-60 is 4.5 sd.
    assert 140 <= out.dropped_loss <= 260, out
    assert 0.06 <= back.dropped_loss / back.offered <= 0.14, back
    assert len(r.receiver.echoes) == back.sent
    assert out.dropped_queue == back.dropped_queue == 0


async def test_gilbert_loss_comes_in_bursts_with_the_same_mean() -> None:
    count = 3000
    async with rig() as r:
        with impaired(LinkImpairment(delay_ms=0, loss=0.1, loss_burst=5, seed=4)) as link:
            for seq in range(count):
                await r.send(seq)
                if seq % 100 == 99:
                    await eventually(
                        lambda: len(r.echo.arrivals) == link.outbound.sent, what="echoes"
                    )
    received = {seq for seq, *_ in r.echo.arrivals}
    lost = [seq not in received for seq in range(count)]
    bursts = sum(1 for i, x in enumerate(lost) if x and (i == 0 or not lost[i - 1]))
    assert 0.05 <= sum(lost) / count <= 0.16
    assert 3.0 <= sum(lost) / bursts <= 8.0  # mean burst length 5 (Bernoulli: ~1.1)


async def test_rate_limit_caps_throughput_and_drops_what_overflows_the_queue() -> None:
    rate_kbps, size = 800, 1000  # 100 kB/s: one 1000-byte packet every 10 ms
    async with rig() as r:
        with impaired(LinkImpairment(delay_ms=0, rate_kbps=rate_kbps, queue_ms=100)) as link:
            started = time.monotonic()
            seq = 0
            while time.monotonic() - started < 1.5:  # offer about twice the rate
                await r.send(seq, size)
                seq += 1
                await asyncio.sleep(0.005)
            await eventually(
                lambda: len(r.echo.arrivals) == link.outbound.sent, within=5, what="the queue"
            )
    arrivals = r.echo.arrivals
    span = arrivals[-1][1] - arrivals[0][1]
    throughput_kbps = (len(arrivals) - 1) * size * 8 / span / 1000
    assert 0.8 * rate_kbps <= throughput_kbps <= 1.1 * rate_kbps, throughput_kbps
    assert link.outbound.dropped_queue > 0
    assert link.outbound.dropped_loss == 0
    # Drop-tail: nothing waited (much) longer than the queue holds.
    waits = [arrived - sent for _, arrived, _, sent in arrivals]
    assert max(waits) < 0.100 + 0.050, max(waits)


async def test_datagrams_in_flight_are_delivered_when_the_block_ends() -> None:
    async with rig() as r:
        with impaired(LinkImpairment(delay_ms=2000)) as link:
            await r.send(1)
            assert link.outbound.delayed == 1
            assert not r.echo.arrivals
        await eventually(lambda: len(r.receiver.echoes) == 1, what="the echo")


# -- real peers through the shim ------------------------------------------------------------


@pytest.mark.slow
async def test_aiortc_peers_connect_and_carry_video_through_an_impaired_link() -> None:
    """Both peers are in this process, so each way crosses the shim twice: 2 x 30 ms of
    round trip, ~2 x 1 % loss, and a 3 Mbit/s bottleneck."""
    small = CaptureConfig(video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig())
    hub = FrameHub(open_video_source(small.video), small)
    encoder = SharedH264Encoder(hub, EncoderSettings(bitrate_kbps=400))
    probe = ProbeSink()
    running = [asyncio.create_task(hub.run()), asyncio.create_task(encoder.run())]
    sinks: list[asyncio.Task[None]] = []
    receiver, sender = new_peer_connection([]), new_peer_connection([])
    receiver.on(
        "track", lambda track: sinks.append(asyncio.create_task(probe.consume("main", track)))
    )
    impairment = LinkImpairment(delay_ms=30, jitter_ms=4, loss=0.01, rate_kbps=3000, seed=5)
    try:
        with impaired(impairment) as link:
            receiver.addTransceiver("video", direction="recvonly").setCodecPreferences(
                h264_preferences()
            )
            await gather(receiver, await receiver.createOffer(), [LOOPBACK])
            await sender.setRemoteDescription(receiver.localDescription)
            route_keyframe_requests(sender.addTrack(encoder.track("r")), encoder.request_keyframe)
            await gather(sender, await sender.createAnswer(), [LOOPBACK])
            answer = sender.localDescription
            await receiver.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
            stats = probe.stats("main")
            await eventually(lambda: stats.advanced >= 45, within=40, what="45 stamped frames")
            rtt: list[float] = []

            async def sender_rtt() -> bool:
                for item in (await sender.getStats()).values():
                    if item.type == "remote-inbound-rtp" and item.roundTripTime is not None:
                        rtt.append(item.roundTripTime)
                        return True
                return False

            deadline = time.monotonic() + 20
            while not await sender_rtt():
                assert time.monotonic() < deadline, "no RTT from RTCP within 20 s"
                await asyncio.sleep(0.2)
            counters = link.counters
    finally:
        await receiver.close()
        await sender.close()
        for task in [*sinks, *running]:
            task.cancel()
        await asyncio.gather(*sinks, *running, return_exceptions=True)
    assert stats.backwards == 0
    assert counters.sent > 100
    assert counters.delayed > 100
    assert counters.dropped_loss > 0
    assert rtt[0] >= 0.055, rtt  # 2 x 30 ms (both ends impaired here)

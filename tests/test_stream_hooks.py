"""The private-API hooks (agent/stream/hooks.py) against the installed aiortc and aioice.

Each hook is exercised on the real library: a real aiortc peer pair on loopback for
the sender and receiver hooks, a real aioice connection pair for the ICE ones, so an
upgrade that moves what a hook relies on fails here, naming the hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.capture import AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config.models import AudioConfig, CaptureConfig, VideoConfig
from agent.stream import EncoderSettings, HubAudioTrack, SharedH264Encoder, hooks
from agent.stream.ice import gather, new_peer_connection
from agent.stream.jitter import AudioJitterBuffer, tune_audio_receiver
from tests.brokers import eventually

ROOT = Path(__file__).resolve().parent.parent
SMALL = CaptureConfig(
    video=VideoConfig(width=320, height=240, fps=15), audio=AudioConfig(frame_ms=20)
)


# -- the version check ------------------------------------------------------------------------


def test_the_installed_libraries_are_in_the_verified_range() -> None:
    hooks.check_versions()


@pytest.mark.parametrize(
    ("installed", "library", "version"),
    [
        ({"aiortc": "1.17.0"}, "aiortc", "1.17.0"),
        ({"aiortc": "1.15.9"}, "aiortc", "1.15.9"),
        ({"aioice": "0.14.0rc1"}, "aioice", "0.14.0rc1"),
        ({"aioice": "not-a-version"}, "aioice", "not-a-version"),
    ],
)
def test_a_version_outside_the_range_fails_naming_the_hooks_and_the_range(
    installed: dict[str, str], library: str, version: str
) -> None:
    with pytest.raises(hooks.UnsupportedVersion) as caught:
        hooks.check_versions(installed)
    message = str(caught.value)
    low, high = hooks.VERIFIED[library]
    assert f"{library} {version} is outside" in message
    assert f"{library}>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}" in message
    for hook in hooks.HOOKS:
        assert (hook.name in message) == (hook.library == library), hook.name


def test_a_patch_release_in_the_range_passes() -> None:
    hooks.check_versions({"aiortc": "1.16.3", "aioice": "0.13.1.post1"})


def test_pyproject_pins_the_verified_ranges() -> None:
    """The pin and the check must agree, or pip installs what the agent then refuses."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for library, (low, high) in hooks.VERIFIED.items():
        pin = f"{library}>={'.'.join(map(str, low))},<{high[0]}.{high[1]}"
        assert pin in project["dependencies"], (pin, project["dependencies"])


def test_every_hook_is_a_documented_function_that_names_its_verified_version() -> None:
    names = {hook.name for hook in hooks.HOOKS}
    assert len(names) == len(hooks.HOOKS)
    for hook in hooks.HOOKS:
        function = getattr(hooks, hook.name)
        doc = " ".join((inspect.getdoc(function) or "").split())
        low = ".".join(map(str, hooks.VERIFIED[hook.library][0]))
        assert f"{hook.library} {low}" in doc, hook.name
        assert "Relies on" in doc, hook.name


# -- aioice: candidates, consent, the datagram path ------------------------------------------


@contextlib.asynccontextmanager
async def ice_pair() -> AsyncIterator[tuple[aioice.ice.Connection, aioice.ice.Connection]]:
    """Two real aioice connections, connected over 127.0.0.1 only."""
    a = aioice.ice.Connection(ice_controlling=True, use_ipv6=False)
    b = aioice.ice.Connection(ice_controlling=False, use_ipv6=False)
    try:
        with hooks.host_addresses(["127.0.0.1"]):
            await asyncio.gather(a.gather_candidates(), b.gather_candidates())
        for here, there in ((a, b), (b, a)):
            here.remote_username = there.local_username
            here.remote_password = there.local_password
            for candidate in there.local_candidates:
                await here.add_remote_candidate(candidate)
            await here.add_remote_candidate(None)
        await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 30)
        yield a, b
    finally:
        await a.close()
        await b.close()


def test_host_addresses_answers_only_inside_the_block() -> None:
    with hooks.host_addresses(["127.0.0.1", "::1"]):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True) == ["::1"]
        with hooks.host_addresses([]):  # empty: aioice's own choice
            assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, False)
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, False)


async def test_the_consent_guard_stops_query_consent_on_a_closed_connection() -> None:
    """Without the guard aioice's query_consent sleeps ~5 s and loops forever; with it a
    closing connection's consent check returns at once. An open one keeps checking."""
    hooks.guard_consent_after_close()
    hooks.guard_consent_after_close()  # idempotent: wrapped once
    wrapped = aioice.ice.Connection.__dict__["query_consent"]
    assert getattr(wrapped, "_agent_stream_wrapped", False)
    async with ice_pair() as (a, b):
        still_checking = asyncio.create_task(b.query_consent())
        await a.close()
        await asyncio.wait_for(a.query_consent(), 1.0)  # returns: nothing left running
        await asyncio.sleep(0.2)
        assert not still_checking.done()  # the open connection's check is untouched
        still_checking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await still_checking


async def test_intercept_sees_every_datagram_and_restores_aioice() -> None:
    before = {name: aioice.ice.StunProtocol.__dict__[name] for name in hooks._STUN_METHODS}
    sizes: dict[str, list[int]] = {"in": [], "out": []}

    def through(way: str) -> hooks.Offer:
        def offer(size: int, deliver: Any) -> None:
            sizes[way].append(size)
            deliver()

        return offer

    with hooks.intercept_stun_datagrams(received=through("in"), sent=through("out")):
        assert aioice.ice.StunProtocol.__dict__["send_data"] is not before["send_data"]
        async with ice_pair() as (a, b):  # connects only if every datagram is delivered
            await a.send(b"hello")
            assert await asyncio.wait_for(b.recv(), 10) == b"hello"
    after = {name: aioice.ice.StunProtocol.__dict__[name] for name in hooks._STUN_METHODS}
    assert after == before
    assert len(sizes["out"]) >= 3  # connectivity checks, answers, data
    assert len(sizes["in"]) >= 3
    assert 5 in sizes["out"]  # b"hello" went out through the hook
    assert 5 in sizes["in"]  # and came in through it


def test_intercept_refuses_a_reshaped_datagram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aioice.ice.StunProtocol, "datagram_received")
    with (
        pytest.raises(hooks.HookUnavailable, match=r"intercept_stun_datagrams.*aioice"),
        hooks.intercept_stun_datagrams(lambda s, d: d(), lambda s, d: d()),
    ):
        pass


def test_host_addresses_refuses_a_reshaped_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda ipv4, ipv6, mdns=True: [])
    with pytest.raises(hooks.HookUnavailable, match="host_addresses"), hooks.host_addresses([]):
        pass


# -- aiortc: a real peer pair on loopback -----------------------------------------------------


async def drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


async def test_sender_and_receiver_hooks_on_a_real_pair() -> None:
    """One call through each aiortc hook on live media: the receiver's real REMB reaches
    route_bitrate_estimates, its real PLI reaches route_keyframe_requests, and Opus
    frames go through the swapped audio jitter buffer (jitter_frame)."""
    video = FrameHub(open_video_source(SMALL.video), SMALL)
    audio = AudioHub(open_audio_source(SMALL.audio), SMALL)
    encoder = SharedH264Encoder(video, EncoderSettings(bitrate_kbps=400))
    receiver, sender = new_peer_connection([]), new_peer_connection([])
    consumers: list[asyncio.Task[None]] = []
    receiver.on("track", lambda track: consumers.append(asyncio.create_task(drain(track))))
    estimates: list[int] = []
    runners = [
        asyncio.create_task(video.run(), name="hooks-video-hub"),
        asyncio.create_task(audio.run(), name="hooks-audio-hub"),
        asyncio.create_task(encoder.run(), name="hooks-encoder"),
    ]
    try:
        receiver.addTransceiver("video", direction="recvonly")
        audio_in = receiver.addTransceiver("audio", direction="recvonly")
        buffer = tune_audio_receiver(audio_in.receiver)
        assert isinstance(buffer, AudioJitterBuffer)
        await gather(receiver, await receiver.createOffer(), ["127.0.0.1"])
        assert_loopback_only(receiver)
        await sender.setRemoteDescription(receiver.localDescription)
        video_out = sender.addTrack(encoder.track("r"))
        hooks.route_keyframe_requests(video_out, encoder.request_keyframe)
        hooks.route_bitrate_estimates(video_out, estimates.append)
        sender.addTrack(HubAudioTrack(audio, "r"))
        await gather(sender, await sender.createAnswer(), ["127.0.0.1"])
        assert_loopback_only(sender)
        answer = sender.localDescription
        await receiver.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))

        await eventually(lambda: len(estimates) > 0, within=30, what="a REMB from the receiver")
        assert all(bps > 0 for bps in estimates)
        await eventually(lambda: buffer.counters.emitted >= 10, within=30, what="Opus frames")
        requests = encoder.keyframe_requests
        video_in = next(t for t in receiver.getTransceivers() if t.kind == "video")
        await video_in.receiver._send_rtcp_pli(video_out._ssrc)  # a PLI on the wire
        await eventually(
            lambda: encoder.keyframe_requests > requests, within=10, what="the PLI at the encoder"
        )
    finally:
        await receiver.close()
        await sender.close()
        for task in [*consumers, *runners]:
            task.cancel()
        await asyncio.gather(*consumers, *runners, return_exceptions=True)


def assert_loopback_only(pc: RTCPeerConnection) -> None:
    """host_addresses held during gathering: every candidate is on 127.0.0.1."""
    description = pc.localDescription
    assert description is not None
    candidates = [line for line in description.sdp.splitlines() if "a=candidate:" in line]
    assert candidates
    assert all(line.split()[4] == "127.0.0.1" for line in candidates), candidates


def test_the_sender_hooks_refuse_an_object_without_the_private_methods() -> None:
    with pytest.raises(hooks.HookUnavailable, match=r"route_keyframe_requests.*aiortc"):
        hooks.route_keyframe_requests(object(), lambda: None)
    with pytest.raises(hooks.HookUnavailable, match=r"route_bitrate_estimates.*aiortc"):
        hooks.route_bitrate_estimates(object(), lambda bps: None)


async def test_the_jitter_hook_refuses_a_receiver_without_the_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("audio", direction="recvonly").receiver
        monkeypatch.delattr(receiver, "_RTCRtpReceiver__kind")
        with pytest.raises(hooks.HookUnavailable, match="replace_jitter_buffer"):
            hooks.replace_audio_jitter_buffer(receiver, AudioJitterBuffer, AudioJitterBuffer)
    finally:
        await pc.close()

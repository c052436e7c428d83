"""The pre-class self-test: is this room ready to teach in, and if not, what to fix.

Run before a lesson (by the on-site assistant, by IT over MQTT with ``cmd/selftest``,
or standalone with ``classroom-agent selftest``), it checks what a lesson needs:

``camera``      frames arrive over a couple of seconds, the picture is not black and
                not frozen;
``microphone``  audio arrives, the level is above silence and it is not clipping;
``echo_path``   a short known sound played on the loudspeakers does not come back
                in what the microphone sends (after echo cancellation): the room's
                sound is fit for a two-way lesson (skipped without loudspeakers);
``disk``        the state directory has room left;
``clock``       the kernel says the clock is synchronised (NTP): lesson times, TLS
                certificates and alert timestamps depend on it (the same reading as
                the health telemetry, `agent.health.system.read_clock_synced`);
``broker``      connected, and a QoS 1 message makes the round trip through the broker
                back to this device (on its own ``probe`` topic, which only it reads).

Each check passes, fails or is skipped, with a message that names the peripheral and
says what to do, because the person reading it is a teacher, not an engineer. The
checks consume the hubs like any other consumer (a subscription each), so running the
self-test during the day disturbs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeVar

import av
import numpy as np

from agent.capture import AudioChunk, AudioHub, FarEndReference, Frame, FrameHub
from agent.health.system import existing_parent, read_clock_synced
from agent.sync import CommandHandler, LinkError, Message, MqttLink, Topics

if TYPE_CHECKING:
    from agent.config import HealthConfig, LoadedConfig

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
_LUMA_STEP = 4  # every 4th pixel each way: plenty for a mean, 16x less work
T = TypeVar("T")


class CheckStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check: its verdict, a sentence for a person, and numbers for a machine."""

    name: str
    status: CheckStatus
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "message": self.message,
            "details": self.details,
        }


@dataclass(frozen=True)
class SelftestReport:
    device: str
    started_at: float  # time.time()
    duration_s: float
    checks: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        """True when nothing failed (skipped checks do not count against the room)."""
        return all(check.status is not CheckStatus.FAIL for check in self.checks)

    def check(self, name: str) -> CheckResult:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; have {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": REPORT_SCHEMA_VERSION,
            "device": self.device,
            "ok": self.ok,
            "at": round(self.started_at, 3),
            "duration_s": round(self.duration_s, 2),
            "checks": [check.to_dict() for check in self.checks],
        }

    def format_table(self) -> str:
        """The report as a few lines a person reads in a terminal."""
        verdict = "READY" if self.ok else "NOT READY"
        lines = [f"Self-test of {self.device}: {verdict} ({self.duration_s:.1f} s)"]
        width = max((len(check.name) for check in self.checks), default=0)
        for check in self.checks:
            lines.append(
                f"  {check.status.value.upper():<4}  {check.name:<{width}}  {check.message}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class SelftestThresholds:
    """What counts as working. Defaults suit a classroom; tests pass shorter times."""

    video_s: float = 2.0  # how long to watch the camera once frames arrive
    audio_s: float = 2.0  # how long to listen
    first_item_timeout_s: float = 5.0  # a camera may take a few seconds to open
    min_frames: int = 2
    black_luma: float = 16.0  # mean luma (0-255) below this is a black picture
    # Frames whose mean absolute luma difference is at most this are "the same": a stuck
    # driver buffer repeats exactly, while a real sensor's noise never does.
    frozen_diff: float = 0.0
    silence_dbfs: float = -60.0  # RMS level below this is silence
    clipping_ratio: float = 0.001  # more than 0.1 % of samples at full scale: clipping
    min_free_mb: float = 1024.0
    max_disk_percent: float = 95.0
    broker_timeout_s: float = 5.0
    echo_play_s: float = 4.0  # the test sound; the canceller converges in the first 2 s
    # The room's own level, listened to before the sound: counted in audio, not in wall
    # time, so a busy device that hands chunks over late still measures this much.
    echo_quiet_s: float = 1.0
    # What comes back of the test sound after processing may raise the microphone this
    # much above the room's own level: a working canceller leaves a few dB, none ~30.
    echo_max_rise_db: float = 10.0

    @classmethod
    def from_health(cls, health: HealthConfig, **overrides: Any) -> SelftestThresholds:
        """The alert thresholds of ``health`` (one meaning of "black" and "silent")."""
        values: dict[str, Any] = {
            "black_luma": health.black_luma_max,
            "silence_dbfs": health.mic_silent_dbfs,
            "max_disk_percent": health.disk_alert_percent,
        }
        values.update(overrides)
        return cls(**values)


# -- checks -----------------------------------------------------------------------------


def _luma(image: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    small = image[::_LUMA_STEP, ::_LUMA_STEP].astype(np.float32)
    if small.ndim == 2:
        return small
    # BGR, ITU-R BT.601 weights: what "dark" means to an eye, not to a channel sum.
    weighted: np.ndarray[Any, np.dtype[np.float32]] = (
        0.114 * small[..., 0] + 0.587 * small[..., 1] + 0.299 * small[..., 2]
    )
    return weighted


async def _collect(
    get: Callable[[], Awaitable[T]],
    use: Callable[[T], None],
    first_timeout_s: float,
    duration_s: float,
) -> tuple[int, float]:
    """Feed ``use`` every item from ``get()`` for ``duration_s`` after the first one.

    Returns (items, seconds watched). Items are used as they come and not kept: two
    seconds of 1080p frames would be hundreds of megabytes.
    """
    try:
        async with asyncio.timeout(first_timeout_s):
            use(await get())
    except TimeoutError:
        return 0, 0.0
    count = 1
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(duration_s):
            while True:
                use(await get())
                count += 1
    return count, time.monotonic() - started


class _PictureStats:
    """Running mean brightness and the largest change between consecutive frames."""

    def __init__(self) -> None:
        self.luma_sum = 0.0
        self.frames = 0
        self.max_change = 0.0
        self._previous: np.ndarray[Any, np.dtype[np.float32]] | None = None

    def add(self, frame: Frame) -> None:
        luma = _luma(frame.image)
        self.luma_sum += float(luma.mean())
        self.frames += 1
        if self._previous is not None and self._previous.shape == luma.shape:
            change = float(np.mean(np.abs(luma - self._previous)))
            self.max_change = max(self.max_change, change)
        self._previous = luma

    @property
    def mean_luma(self) -> float:
        return self.luma_sum / self.frames if self.frames else 0.0


def _label(kind: str, description: str) -> str:
    """``camera /dev/video0`` as is; ``camera (synthetic 1280x720@30)`` for the others."""
    return description if description.startswith(kind) else f"{kind} ({description})"


def _device_hint(reason: str) -> str:
    if "cannot open" in reason:
        return (
            "check that it is plugged in and that the configured device is right "
            "(`classroom-agent devices` lists them); if the agent is running, it may hold "
            "the device: run the self-test through the agent instead (MQTT cmd/selftest)"
        )
    return "check its cable and power; unplug and replug it"


async def check_camera(hub: FrameHub | None, limits: SelftestThresholds) -> CheckResult:
    """Frames arrive, are not black and not frozen."""
    if hub is None:
        return CheckResult("camera", CheckStatus.SKIP, "camera: no video hub in this agent")
    label = _label("camera", hub.source.description)
    picture = _PictureStats()
    with hub.subscribe(f"selftest-{uuid.uuid4().hex[:6]}") as frames:
        count, seconds = await _collect(
            frames.get, picture.add, limits.first_item_timeout_s, limits.video_s
        )
    state, reason = hub.state, hub.reason
    details: dict[str, Any] = {"frames": count, "state": state.value, "reason": reason}
    if not count:
        return CheckResult(
            "camera",
            CheckStatus.FAIL,
            f"{label}: no picture within {limits.first_item_timeout_s:g} s ({state.value}: "
            f"{reason}); {_device_hint(reason)}",
            details,
        )
    mean_luma = picture.mean_luma
    details.update(
        fps=round((count - 1) / seconds, 1) if seconds > 0 else None,
        mean_luma=round(mean_luma, 1),
        mode=str(hub.mode) if hub.mode else None,
    )
    if count < limits.min_frames:
        return CheckResult(
            "camera",
            CheckStatus.FAIL,
            f"{label}: only {count} frame(s) in {limits.video_s:g} s; the camera is "
            f"stalling ({state.value}: {reason}); {_device_hint(reason)}",
            details,
        )
    if mean_luma < limits.black_luma:
        return CheckResult(
            "camera",
            CheckStatus.FAIL,
            f"{label}: the picture is black (mean brightness {mean_luma:.1f} of 255, below "
            f"{limits.black_luma:g}); remove the lens cap or open the privacy shutter, and "
            "switch on the room lights",
            details,
        )
    change = picture.max_change
    details["max_frame_change"] = round(change, 2)
    if change <= limits.frozen_diff:
        return CheckResult(
            "camera",
            CheckStatus.FAIL,
            f"{label}: the picture is frozen ({count} identical frames in "
            f"{seconds:.1f} s); unplug and replug the camera, or restart capture "
            "(MQTT cmd/restart-capture)",
            details,
        )
    fps = details["fps"]
    return CheckResult(
        "camera",
        CheckStatus.PASS,
        f"{label}: {count} frames in {seconds:.1f} s"
        + (f" ({fps:g} fps)" if fps else "")
        + f", brightness {mean_luma:.0f}, moving picture",
        details,
    )


def _dbfs(power: float) -> float:
    return max(-120.0, 10 * float(np.log10(power / 32768.0**2))) if power > 0 else -120.0


async def check_microphone(hub: AudioHub | None, limits: SelftestThresholds) -> CheckResult:
    """Audio arrives, is louder than silence, and does not clip."""
    if hub is None:
        return CheckResult("microphone", CheckStatus.SKIP, "microphone: no audio hub in this agent")
    label = _label("microphone", hub.source.description)
    audio: list[AudioChunk] = []
    with hub.subscribe(f"selftest-{uuid.uuid4().hex[:6]}", max_chunks=500) as chunks:
        count, seconds = await _collect(
            chunks.get, audio.append, limits.first_item_timeout_s, limits.audio_s
        )
    state, reason = hub.state, hub.reason
    details: dict[str, Any] = {"chunks": count, "state": state.value, "reason": reason}
    if not count:
        return CheckResult(
            "microphone",
            CheckStatus.FAIL,
            f"{label}: no audio within {limits.first_item_timeout_s:g} s ({state.value}: "
            f"{reason}); {_device_hint(reason)}",
            details,
        )
    # A couple of seconds of PCM is small (2 s of 48 kHz mono: 192 kB): keep it whole.
    samples = np.concatenate([chunk.samples.reshape(-1) for chunk in audio])
    power = float(np.mean(np.square(samples, dtype=np.float32))) if samples.size else 0.0
    level = _dbfs(power)
    clipped = int(np.count_nonzero((samples >= 32767) | (samples <= -32768)))
    ratio = clipped / samples.size if samples.size else 0.0
    details.update(
        seconds=round(seconds, 2),
        level_dbfs=round(level, 1),
        peak_dbfs=round(_dbfs(float(np.max(np.abs(samples.astype(np.int32)))) ** 2), 1)
        if samples.size
        else None,
        clipped_ratio=round(ratio, 5),
    )
    if level < limits.silence_dbfs:
        return CheckResult(
            "microphone",
            CheckStatus.FAIL,
            f"{label}: silent (level {level:.0f} dBFS, below {limits.silence_dbfs:g}); "
            "unmute the microphone, check its cable, and speak near it while the test runs",
            details,
        )
    if ratio > limits.clipping_ratio:
        return CheckResult(
            "microphone",
            CheckStatus.FAIL,
            f"{label}: clipping ({ratio:.1%} of samples at full scale); lower the microphone "
            "gain or move it away from the loudspeaker",
            details,
        )
    return CheckResult(
        "microphone",
        CheckStatus.PASS,
        f"{label}: level {level:.0f} dBFS over {seconds:.1f} s, no clipping",
        details,
    )


def check_disk(state_dir: Path, limits: SelftestThresholds) -> CheckResult:
    """Free space where the agent keeps its state (store-and-forward, profiles, records)."""
    measured_at = existing_parent(Path(state_dir))
    try:
        usage = shutil.disk_usage(measured_at)
    except OSError as exc:
        return CheckResult(
            "disk", CheckStatus.FAIL, f"disk: cannot read free space of {state_dir}: {exc}"
        )
    free_mb = usage.free / 2**20
    percent = 100.0 * usage.used / usage.total if usage.total else 100.0
    details = {
        "path": str(state_dir),
        "measured_at": str(measured_at),
        "free_mb": round(free_mb, 1),
        "percent": round(percent, 1),
    }
    where = str(state_dir)
    if free_mb < limits.min_free_mb or percent > limits.max_disk_percent:
        return CheckResult(
            "disk",
            CheckStatus.FAIL,
            f"disk: only {free_mb:.0f} MB free on {where} ({percent:.0f}% used); free some "
            "space (old recordings, logs) or ask IT to purge local records",
            details,
        )
    return CheckResult(
        "disk",
        CheckStatus.PASS,
        f"disk: {free_mb / 1024:.1f} GB free on {where} ({percent:.0f}% used)",
        details,
    )


def check_clock(clock_synced: Callable[[], bool | None]) -> CheckResult:
    synced = clock_synced()
    if synced is None:
        return CheckResult(
            "clock", CheckStatus.SKIP, "clock: cannot tell whether it is synchronised here"
        )
    if not synced:
        return CheckResult(
            "clock",
            CheckStatus.FAIL,
            "clock: not synchronised; lesson times, certificates and alerts depend on it: "
            "check the network and the time service (`timedatectl`, chrony or "
            "systemd-timesyncd)",
            {"synced": False},
        )
    return CheckResult("clock", CheckStatus.PASS, "clock: synchronised", {"synced": True})


def _is_probe(message: Message, nonce: str) -> bool:
    try:
        data = message.json()
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("nonce") == nonce


async def check_broker(
    link: MqttLink | None, limits: SelftestThresholds, *, topic: str | None = None
) -> CheckResult:
    """Connected, and a QoS 1 message goes out and comes back through the broker.

    The probe travels on the device's own ``probe`` topic, which nothing else reads, so
    the round trip proves the credentials, the ACL and the routing in one go without
    disturbing any consumer. ``topic``: another probe topic (the link's own by default).
    """
    if link is None:
        return CheckResult("broker", CheckStatus.SKIP, "broker: not checked (no MQTT link)")
    details: dict[str, Any] = {"url": link.url}
    if not link.is_connected:
        with contextlib.suppress(TimeoutError):
            await link.wait_connected(limits.broker_timeout_s)
    if not link.is_connected:
        last = link.stats().last_error or "no answer"
        details["last_error"] = last
        return CheckResult(
            "broker",
            CheckStatus.FAIL,
            f"broker {link.url}: not connected ({last}); check the network cable or Wi-Fi, "
            "and ask IT whether the broker is up",
            details,
        )
    topic = topic or link.topics.probe
    nonce = uuid.uuid4().hex
    try:
        async with (
            asyncio.timeout(limits.broker_timeout_s),
            link.subscribe(topic, qos=1, maxsize=16) as inbox,
        ):
            started = time.monotonic()
            await link.publish(topic, {"type": "selftest-probe", "nonce": nonce}, qos=1)
            acked = time.monotonic()
            while not _is_probe(await inbox.get(), nonce):
                pass
            back = time.monotonic()
    except TimeoutError:
        return CheckResult(
            "broker",
            CheckStatus.FAIL,
            f"broker {link.url}: connected, but a test message did not come back within "
            f"{limits.broker_timeout_s:g} s; the broker or its ACL is misconfigured (ask IT)",
            details,
        )
    except LinkError as exc:
        return CheckResult(
            "broker",
            CheckStatus.FAIL,
            f"broker {link.url}: test message refused ({exc}); ask IT to check this device's "
            "broker account",
            details,
        )
    details.update(
        publish_rtt_ms=round((acked - started) * 1000, 1),
        round_trip_ms=round((back - started) * 1000, 1),
    )
    return CheckResult(
        "broker",
        CheckStatus.PASS,
        f"broker {link.url}: connected, round trip {details['round_trip_ms']:.0f} ms",
        details,
    )


class Speaker(Protocol):
    """The room's loudspeakers as the self-test uses them: the playback's observer face
    (``agent.stream.AudioPlayback``), which plays ``av.AudioFrame``s from a source."""

    def observe(self, source: str, kind: str, frame: Any) -> None: ...


class Loudspeakers(Speaker, Protocol):
    """A playback the standalone self-test runs itself (``AudioPlayback``)."""

    reference: FarEndReference | None

    def start(self) -> None: ...

    async def stop(self) -> None: ...


ECHO_TEST_SOURCE = "selftest"
_ECHO_RATE = 48_000
_ECHO_FRAME = _ECHO_RATE // 50  # 20 ms, as the lesson's Opus frames
_ECHO_DBFS = -20.0


def echo_test_sound(seconds: float, rate: int = _ECHO_RATE) -> np.ndarray[Any, np.dtype[np.int16]]:
    """The known test sound: speech-band noise (200 Hz-4 kHz) cut into syllables of
    100-250 ms with short gaps, at -20 dBFS while sounding, from a fixed seed.
    Broadband, so the canceller learns the whole band at once (single tones would be
    new to it each time), and changing, so noise suppression does not take it for
    the room's noise."""
    rng = np.random.default_rng(2026)
    n = round(seconds * rate)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 200) | (freqs > 4000)] = 0
    noise = np.fft.irfft(spectrum, n)
    envelope = np.zeros(n)
    at = 0
    while at < n:
        length = round(rng.uniform(0.10, 0.25) * rate)
        t = np.arange(min(length, n - at)) / rate
        edge = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        envelope[at : at + len(t)] = edge * rng.uniform(0.5, 1.0)
        at += length + round(rng.uniform(0.03, 0.08) * rate)
    sound = noise * envelope
    sounding = envelope > 0
    sound *= 10 ** (_ECHO_DBFS / 20) / np.sqrt(np.mean(sound[sounding] ** 2))
    pcm: np.ndarray[Any, np.dtype[np.int16]] = np.round(np.clip(sound, -1, 1) * 32767).astype(
        np.int16
    )
    return pcm


def _audio_frame(mono: np.ndarray[Any, np.dtype[np.int16]]) -> Any:
    frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2)[None, :], format="s16", layout="stereo")
    frame.sample_rate = _ECHO_RATE
    return frame


async def _play(speaker: Speaker, sound: np.ndarray[Any, np.dtype[np.int16]]) -> None:
    """Hand ``sound`` to the playback in 20 ms frames, in real time, 60 ms ahead."""
    started = time.monotonic()
    for index, at in enumerate(range(0, len(sound) - _ECHO_FRAME + 1, _ECHO_FRAME)):
        due = started + index * _ECHO_FRAME / _ECHO_RATE - 0.06
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        speaker.observe(ECHO_TEST_SOURCE, "audio", _audio_frame(sound[at : at + _ECHO_FRAME]))


async def _collect_audio(
    get: Callable[[], Awaitable[AudioChunk]],
    into: list[AudioChunk],
    first_timeout_s: float,
    audio_s: float,
) -> None:
    """Append chunks until they hold ``audio_s`` of sound (or the source stalls)."""
    heard = 0.0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(first_timeout_s + 2 * audio_s):
            while heard < audio_s:
                chunk = await get()
                into.append(chunk)
                heard += chunk.duration_s


def _level(chunks: list[AudioChunk]) -> float:
    if not chunks:
        return -120.0
    samples = np.concatenate([c.samples.reshape(-1) for c in chunks])
    return _dbfs(float(np.mean(np.square(samples, dtype=np.float32))))


async def check_echo_path(
    hub: AudioHub | None, speaker: Speaker | None, limits: SelftestThresholds
) -> CheckResult:
    """Play a known sound on the loudspeakers and measure how much of it the microphone
    still sends after processing, against the room's own level just before."""
    name = "echo_path"
    if speaker is None:
        return CheckResult(name, CheckStatus.SKIP, "echo path: no loudspeakers in this agent")
    if hub is None:
        return CheckResult(name, CheckStatus.SKIP, "echo path: no microphone in this agent")
    sound = echo_test_sound(limits.echo_play_s)
    quiet: list[AudioChunk] = []
    during: list[AudioChunk] = []
    with hub.subscribe(f"selftest-echo-{uuid.uuid4().hex[:6]}", max_chunks=1000) as chunks:
        await _collect_audio(chunks.get, quiet, limits.first_item_timeout_s, limits.echo_quiet_s)
        if not quiet:
            return CheckResult(
                name, CheckStatus.SKIP, "echo path: the microphone sends no audio (see microphone)"
            )
        player = asyncio.create_task(_play(speaker, sound), name="selftest:echo-sound")
        try:
            # By audio too: on a busy device the chunks come late, and a wall-clock
            # window would leave the sound's end (where the echo is measured) unread.
            await _collect_audio(
                chunks.get, during, limits.first_item_timeout_s, limits.echo_play_s + 0.5
            )
        finally:
            player.cancel()
            await asyncio.gather(player, return_exceptions=True)
        processing = hub.stats().processing
    # The last 40 % of the sound: the canceller has converged, the echo has arrived.
    tail = during[len(during) * 3 // 5 :]
    room_level, sent_level = _level(quiet), _level(tail)
    rise = sent_level - room_level
    details: dict[str, Any] = {
        "played_dbfs": _ECHO_DBFS,
        "room_level_dbfs": round(room_level, 1),
        "sent_level_dbfs": round(sent_level, 1),
        "rise_db": round(rise, 1),
    }
    if processing is not None:
        details["processing"] = {
            key: value
            for key, value in processing.to_dict().items()
            if key in ("active", "stages", "reference", "echo_delay_ms", "echo_path_ms", "erle_db")
        }
        details["microphone_input_dbfs"] = (
            None if processing.input_level_dbfs is None else round(processing.input_level_dbfs, 1)
        )
    if (
        processing is not None
        and processing.echo_cancellation
        and processing.reference != "playing"
    ):
        return CheckResult(
            name,
            CheckStatus.SKIP,
            "echo path: the test sound did not reach the loudspeakers (a lesson is "
            "playing, or the loudspeakers are lost); run the self-test before the lesson",
            details,
        )
    if rise > limits.echo_max_rise_db:
        hint = (
            "the software echo canceller is off: turn capture.audio.processing."
            "echo_cancellation on unless the speakerphone cancels echo itself"
            if processing is None or not processing.echo_cancellation
            else "the echo canceller is not keeping up: lower the loudspeaker volume or "
            "move the microphone away from the loudspeakers"
        )
        return CheckResult(
            name,
            CheckStatus.FAIL,
            f"echo path: the loudspeakers come back in the microphone {rise:.0f} dB above "
            f"the room ({sent_level:.0f} dBFS sent); the other rooms would hear "
            f"themselves; {hint}",
            details,
        )
    return CheckResult(
        name,
        CheckStatus.PASS,
        f"echo path: a test sound on the loudspeakers raised what the microphone sends "
        f"by {max(0.0, rise):.0f} dB (at most {limits.echo_max_rise_db:g})",
        details,
    )


async def run_selftest(
    video: FrameHub | None,
    audio: AudioHub | None,
    *,
    state_dir: Path,
    link: MqttLink | None = None,
    device: str | None = None,
    thresholds: SelftestThresholds | None = None,
    clock_synced: Callable[[], bool | None] | None = None,
    probe: str | None = None,
    speaker: Speaker | None = None,
) -> SelftestReport:
    """Run every check (camera and microphone at the same time) and return the report.

    The hubs must be running (the daemon's are; the CLI starts its own). ``device``
    names the report (default: the link's device id). ``clock_synced`` replaces the
    kernel reading (tests). ``probe``: the probe topic (see `check_broker`).
    ``speaker``: the room's playback, for the echo-path check (after the microphone
    check, whose level the test sound would spoil).
    """
    limits = thresholds or SelftestThresholds()
    started_wall, started = time.time(), time.monotonic()
    # A TaskGroup, not gather(): if one check fails unexpectedly the others are
    # cancelled with it instead of running on unowned.
    async with asyncio.TaskGroup() as group:
        camera_task = group.create_task(check_camera(video, limits), name="selftest:camera")
        mic_task = group.create_task(check_microphone(audio, limits), name="selftest:mic")
        broker_task = group.create_task(
            check_broker(link, limits, topic=probe), name="selftest:broker"
        )
    camera, microphone, broker = camera_task.result(), mic_task.result(), broker_task.result()
    echo = await check_echo_path(audio, speaker, limits)
    disk = await asyncio.to_thread(check_disk, state_dir, limits)
    clock = await asyncio.to_thread(check_clock, clock_synced or read_clock_synced)
    name = device or (link.identity.device_id if link is not None else "this device")
    report = SelftestReport(
        device=name,
        started_at=started_wall,
        duration_s=time.monotonic() - started,
        checks=(camera, microphone, echo, disk, clock, broker),
    )
    failed = [check.name for check in report.checks if check.status is CheckStatus.FAIL]
    if failed:
        log.warning("self-test of %s failed: %s", name, ", ".join(failed))
    else:
        log.info("self-test of %s passed", name)
    return report


def selftest_handler(
    video: FrameHub | None,
    audio: AudioHub | None,
    *,
    state_dir: Path,
    link: MqttLink | None,
    thresholds: SelftestThresholds | None = None,
    speaker: Speaker | None = None,
) -> CommandHandler:
    """The ``selftest`` command for `agent.sync.commands.CommandService` (report as result).

    A failed self-test is still a successful command: ``ok`` says the test ran, the
    report's own ``ok`` says whether the room is ready.
    """

    async def selftest(args: dict[str, Any]) -> dict[str, Any]:
        report = await run_selftest(
            video, audio, state_dir=state_dir, link=link, thresholds=thresholds, speaker=speaker
        )
        return report.to_dict()

    return selftest


# -- standalone (classroom-agent selftest) ----------------------------------------------


def _cli_link(loaded: LoadedConfig) -> tuple[MqttLink | None, str]:
    """A link for the broker check that does not knock the daemon off the broker.

    The daemon, if running, is connected with client id ``site.room``; a second client
    with the same id would take its session over (and fire its Last Will). So the CLI
    connects as ``site.room-selftest``, with the device's own user name, password and
    certificate (the ACL is per user, not per client id), sends no birth or will, and
    probes the device's own ``probe`` topic.
    """
    config = loaded.config
    identity = config.identity
    device_id = identity.device_id
    if config.broker.url is None:
        return None, "no broker.url: this room uses the embedded broker"
    room = f"{identity.room}-selftest"
    if len(room) > 63:
        return None, "the room id is too long for a separate self-test client id"
    broker = config.broker
    if broker.username is None and (broker.password or broker.password_file):
        broker = broker.model_copy(update={"username": device_id})
    probe_identity = identity.model_copy(update={"room": room, "groups": []})
    from agent import __version__  # noqa: PLC0415  (only the CLI needs it)

    link = MqttLink(
        broker,
        probe_identity,
        software_version=__version__,
        profile_name=loaded.profile,
        announce=False,
    )
    return link, ""


async def _selftest_standalone(
    loaded: LoadedConfig,
    thresholds: SelftestThresholds | None,
    open_speaker: Callable[[], Loudspeakers | None] | None = None,
) -> SelftestReport:
    from agent.capture import open_audio_source, open_video_source  # noqa: PLC0415

    config = loaded.config
    video = FrameHub(open_video_source(config.capture.video), config.capture)
    audio = AudioHub(open_audio_source(config.capture.audio), config.capture)
    speaker = open_speaker() if open_speaker is not None else None
    if speaker is not None:  # wired as the daemon wires it: the canceller hears it
        speaker.reference = audio.echo_reference()
        speaker.start()
    link, why_not = _cli_link(loaded)
    tasks = [
        asyncio.create_task(video.run(), name="selftest:video"),
        asyncio.create_task(audio.run(), name="selftest:audio"),
    ]
    if link is not None:
        tasks.append(asyncio.create_task(link.run(), name="selftest:mqtt"))
    try:
        report = await run_selftest(
            video,
            audio,
            state_dir=config.supervisor.state_dir,
            link=link,
            device=config.identity.device_id,
            thresholds=thresholds,
            probe=Topics(
                config.broker.topic_prefix, config.identity.site, config.identity.room
            ).probe,
            speaker=speaker,
        )
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if speaker is not None:
            await speaker.stop()
    for task, outcome in zip(tasks, results, strict=True):
        if isinstance(outcome, Exception):
            log.warning("%s stopped with an error: %s", task.get_name(), outcome)
    if link is None:
        skipped = CheckResult("broker", CheckStatus.SKIP, f"broker: not checked ({why_not})")
        checks = tuple(skipped if c.name == "broker" else c for c in report.checks)
        report = SelftestReport(report.device, report.started_at, report.duration_s, checks)
    return report


def run_selftest_cli(
    loaded: LoadedConfig,
    *,
    json_output: bool,
    out: TextIO | None = None,
    thresholds: SelftestThresholds | None = None,
    open_speaker: Callable[[], Loudspeakers | None] | None = None,
) -> int:
    """``classroom-agent selftest``: start capture, run the checks, print, exit 0 or 1.

    Writes a table (or the JSON report with ``json_output``) to ``out`` (stdout).
    ``open_speaker`` builds the room's playback (``stream.playback``) for the
    echo-path check; without it that check is skipped.
    """
    stream = out if out is not None else sys.stdout
    limits = thresholds or SelftestThresholds.from_health(loaded.config.health)
    report = asyncio.run(_selftest_standalone(loaded, limits, open_speaker))
    if json_output:
        stream.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        stream.write(report.format_table() + "\n")
    stream.flush()
    return 0 if report.ok else 1

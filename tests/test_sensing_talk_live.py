"""The talk analysis live: the microphone in 20 ms blocks (and what the agent played over
them) through the streaming VAD, and the sensing service publishing a lesson's S-T
figures from a microphone that is an espeak-ng lesson WAV (the 'file' audio source).

The lessons are tests/test_sensing_talk.py's (synthetic, labelled so: espeak-ng voices,
teacher at -20 dBFS, reverberant pupils at -36, 4 s samples instead of 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from agent.capture import AudioChunk, AudioHub, FrameHub, open_audio_source, open_video_source
from agent.config import AudioProcessingConfig, SensingConfig
from agent.config.models import AudioConfig, CaptureConfig
from agent.sensing.st_analysis import sample
from agent.sensing.talk import SileroVad, analyse_talk, write_wav
from agent.sensing.talk_live import LiveTalk, StreamResampler
from agent.testkit.acoustics import espeak_available
from tests.brokers import eventually
from tests.rooms import SMALL
from tests.sensing_data import lessonless_service, room_service
from tests.test_contracts import schema
from tests.test_sensing_talk import (  # noqa: F401  (voices, vad: fixtures)
    INTERVAL_S,
    RATE,
    _check,
    lesson,
    vad,
    voices,
)

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")

BLOCK = RATE // 50  # the hub's 20 ms chunks


def _fed(talk: LiveTalk, mic: np.ndarray, played: np.ndarray | None) -> LiveTalk:
    for at in range(0, len(mic), BLOCK):
        talk.feed(mic[at : at + BLOCK], None if played is None else played[at : at + BLOCK])
    return talk


def test_the_resampler_in_blocks_is_the_whole_signal_resampled() -> None:
    signal = np.random.default_rng(2).standard_normal(RATE).astype(np.float32)
    whole = StreamResampler(RATE)(signal)
    pieces = StreamResampler(RATE)
    cuts = np.cumsum(np.random.default_rng(3).integers(10, 2000, 100))
    fed = np.concatenate([pieces(p) for p in np.split(signal, cuts[cuts < len(signal)])])
    assert len(fed) == len(whole) == RATE // 3
    np.testing.assert_allclose(fed, whole, atol=1e-5)


def test_live_talk_in_blocks_gives_the_lessons_mode(
    voices: dict[str, np.ndarray],  # noqa: F811
    vad: SileroVad,  # noqa: F811
) -> None:
    # A main-room dialogue, the level rule alone: the same samples as the recording's.
    script = "TSTSTSTSTS"
    mic, _ = lesson(script, voices)
    talk = _fed(LiveTalk(vad, RATE, role="main", interval_s=INTERVAL_S), mic, None)
    assert abs(talk.heard_s - len(mic) / RATE) < 0.05
    assert not talk.referenced
    offline = analyse_talk(mic, RATE, role="main", vad=vad)
    st = talk.result()
    assert st.samples == sample(offline.spans, offline.duration_s, interval_s=INTERVAL_S)
    _check(st.samples, script, "dialogue")
    # A receiving room: the remote teacher on the loudspeaker, the played track as the
    # reference block by block, is T (a lecture) ...
    script = "TTTSTTTSTT"
    mic, played = lesson(script, voices, remote="T")
    talk = _fed(LiveTalk(vad, RATE, role="receiving", interval_s=INTERVAL_S), mic, played)
    assert talk.referenced
    _check(talk.result().samples, script, "lecture")
    # ... also where the echo canceller took the loudspeaker out of the microphone.
    quiet, _ = lesson(script.replace("T", "."), voices)
    talk = _fed(LiveTalk(vad, RATE, role="receiving", interval_s=INTERVAL_S), quiet, played)
    _check(talk.result().samples, script, "lecture")
    # Without the reference it is the local class talking: all S.
    talk = _fed(LiveTalk(vad, RATE, role="receiving", interval_s=INTERVAL_S), mic, None)
    assert talk.result().samples == "S" * len(script)


class Collected:
    """The publisher's seat (the outbox path is tests/test_sensing_service.py's)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def send(self, topic: str, payload: Any, kind: Any = "event") -> Any:
        json.dumps(payload)  # what the outbox would store
        self.messages.append(payload)


@contextlib.asynccontextmanager
async def _running(*coroutines: Any) -> Any:
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow
async def test_the_service_publishes_a_lessons_st_figures_from_the_microphone(
    tmp_path: Path,
    voices: dict[str, np.ndarray],  # noqa: F811
) -> None:
    script = "TTST"  # 16 s in real time: Rt 0.75, a lecture
    mic, _ = lesson(script, voices)
    wav = tmp_path / "lesson.wav"
    write_wav(wav, mic, RATE)
    capture = CaptureConfig(
        video=SMALL.video,
        audio=AudioConfig(source="file", path=wav, processing=AudioProcessingConfig(mode="off")),
    )
    video = FrameHub(open_video_source(capture.video), capture)
    audio = AudioHub(open_audio_source(capture.audio), capture)
    config = SensingConfig(enabled=True, sample_fps=5, st_interval_s=INTERVAL_S)
    now = {"lesson": "lesson-st"}
    publisher = Collected()
    service = room_service(
        tmp_path / "store",
        config,
        video,
        lesson=lambda: now["lesson"],
        publisher=publisher,
        audio=audio,
    )

    def talk() -> dict[str, Any]:
        section = service.health_section()
        assert section is not None
        return dict(section["talk"])

    async with _running(video.run(), service.run()):
        await eventually(lambda: talk()["role"] == "main", within=60, what="the lesson open")
        assert talk()["state"] == "idle"
        # The microphone starts with the lesson: the WAV's first sample is the lesson's.
        async with _running(audio.run()):
            await eventually(lambda: talk()["heard_s"] >= len(mic) / RATE, within=60)
            section = service.health_section()
            assert talk()["state"] == "listening"
            now["lesson"] = None
            await eventually(
                lambda: any(m["kind"] == "st" for m in publisher.messages),
                within=30,
                what="the S-T figures",
            )
    assert talk()["lessons"] == 1
    assert talk()["dropped"] == 0
    jsonschema.validate(section, schema("sensing")["$defs"]["section"])
    (st,) = [m for m in publisher.messages if m["kind"] == "st"]
    jsonschema.validate(st, schema("sensing"))
    assert (st["lesson"], st["role"], st["interval_s"]) == ("lesson-st", "main", INTERVAL_S)
    _check(st["samples"], script, "lecture")
    assert (st["n"], st["rt"], st["mode"]) == (4, 0.75, "lecture"), st
    # Aggregates only: flat scalars, small.
    assert all(not isinstance(v, (list, dict)) for v in st.values())
    assert len(json.dumps(st)) < 512


def test_the_service_reads_what_the_loudspeakers_played_over_each_chunk(
    tmp_path: Path,
) -> None:
    """The reference is the echo canceller's: what the playback pushed, read for the
    chunk's own samples (a chunk is stamped when complete); nothing when the room plays
    nothing, or plays no more."""
    audio = AudioHub(open_audio_source(SMALL.audio), SMALL)  # processing: auto
    service = lessonless_service(tmp_path / "store", publisher=Collected(), audio=audio)
    silence = np.zeros((BLOCK, 1), np.int16)

    def chunk(captured_ns: int) -> AudioChunk:
        return AudioChunk(silence, 0, captured_ns, 0, RATE)

    t0 = 10**12
    assert service._played(chunk(t0)) is None  # no playback, no reference
    reference = audio.echo_reference()
    assert reference is not None
    tone = (np.sin(np.arange(RATE) * 2 * np.pi * 440 / RATE) * 8000).astype(np.int16)
    reference.push(tone[:, None], RATE, t0)  # heard from t0 on, for 1 s
    played = service._played(chunk(t0 + 500_000_000 + 20_000_000))  # samples 0.5-0.52 s
    assert played is not None
    np.testing.assert_allclose(played, tone[RATE // 2 : RATE // 2 + BLOCK] / 32768.0, atol=1e-4)
    assert service._played(chunk(t0 + 3_000_000_000)) is None  # 2 s after it stopped

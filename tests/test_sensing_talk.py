"""Who is talking and S-T analysis, on lessons spoken by espeak-ng with a known script.

Honestly synthetic: the voices are Debian's espeak-ng (the teacher ``en-gb``, the pupils
``en-us+f4``), the lessons agent/testkit/acoustics.py's builder (``lesson_audio``, which
the demo's sensing room speaks too) with its synthetic impulse response, and
the distance is a level: the teacher reaches the microphone at -20 dBFS (RMS while
speaking), pupils at their seats at -36 dBFS, more reverberant; white noise at -65 dBFS.
In the receiving room the remote teacher comes out of the loudspeaker (the agent's own
playback, passed as the reference) at -24 dBFS through the room's response.

The lessons are short: one sample every 4 s instead of the standard 30 s (the sample
interval is a parameter; 30 s stays the default), 10 samples a lesson. Tolerances: at
most one sample of ten wrong against the script, so Rt and Ch each within 0.1 (one sample
changes Rt by 0.1 and the run count by at most 2), and the mode exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.sensing.st_analysis import SAMPLE_INTERVAL_S, analyse, sample
from agent.sensing.talk import SileroVad, analyse_talk, resample, write_wav
from agent.testkit.acoustics import espeak_available, lesson_audio, lesson_voices

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")

RATE = 48_000
INTERVAL_S = 4.0


@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    return lesson_voices(RATE)


def lesson(
    script: str, voices: dict[str, np.ndarray], *, remote: str = ""
) -> tuple[np.ndarray, np.ndarray | None]:
    """The microphone (and what the agent played) for ``script`` at this file's interval:
    per interval 'T' the teacher talks 2.8 s, 'S' a pupil, '.' silence."""
    return lesson_audio(script, voices, rate=RATE, interval_s=INTERVAL_S, remote=remote)


def truth(script: str) -> str:
    return script.replace(".", "S")


LESSONS = {
    # name: (script, the mode the S-T standard gives the true samples)
    "lecture": ("TTTTSTTTTT", "lecture"),  # Rt 0.9, Ch 0.2
    "practice": ("TS..S.S.ST", "practice"),  # Rt 0.2
    "dialogue": ("TSTSTSTSTS", "dialogue"),  # Rt 0.5, Ch 0.9
    "mixed": ("TTTTT.SSS.", "mixed"),  # Rt 0.5, Ch 0.1
}


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def _check(result_samples: str, script: str, mode: str) -> None:
    expected = analyse(truth(script), INTERVAL_S)
    assert expected.mode == mode  # the script itself is the mode it claims
    got = analyse(result_samples, INTERVAL_S)
    wrong = sum(a != b for a, b in zip(result_samples, truth(script), strict=True))
    assert wrong <= 1, f"{result_samples} vs script {truth(script)}"
    assert abs(got.rt - expected.rt) <= 0.1 + 1e-9
    assert abs(got.ch - expected.ch) <= 0.1 + 1e-9
    assert got.mode == mode, f"{result_samples}: Rt {got.rt} Ch {got.ch}"


@pytest.mark.parametrize("name", list(LESSONS))
def test_main_room_lessons_get_their_mode(
    name: str, voices: dict[str, np.ndarray], vad: SileroVad
) -> None:
    script, mode = LESSONS[name]
    mic, _ = lesson(script, voices)
    result = analyse_talk(mic, RATE, role="main", vad=vad)
    samples = sample(result.spans, result.duration_s, interval_s=INTERVAL_S)
    _check(samples, script, mode)
    # Talk time per speaker: 50-110 % of the script's 2.8 s per talking interval (the
    # script counts espeak's pauses between words and sentences as talk; the VAD does not).
    for who in "TS":
        scripted = 2.8 * script.count(who)
        assert 0.5 * scripted <= result.talk_s(who) <= 1.1 * scripted + 0.3, who


def test_receiving_room_counts_the_loudspeaker_as_the_teacher(
    voices: dict[str, np.ndarray], vad: SileroVad
) -> None:
    script = "TTTSTTTSTT"  # the remote teacher on the loudspeaker, local pupils answering
    mic, played = lesson(script, voices, remote="T")
    result = analyse_talk(mic, RATE, role="receiving", reference=played, vad=vad)
    assert {s.source for s in result.spans if s.speaker == "T"} == {"loudspeaker"}
    samples = sample(result.spans, result.duration_s, interval_s=INTERVAL_S)
    _check(samples, script, "lecture")
    # Without the reference the loudspeaker is just the room talking: all S (a practice
    # lesson), which is why the agent passes what it plays.
    blind = analyse_talk(mic, RATE, role="receiving", vad=vad)
    assert sample(blind.spans, blind.duration_s, interval_s=INTERVAL_S) == "S" * len(script)


def test_main_room_counts_remote_pupils_on_its_loudspeaker_as_the_class(
    voices: dict[str, np.ndarray], vad: SileroVad
) -> None:
    """The main room's loudspeaker plays the receiving rooms' pupils at -24 dBFS, louder
    than the teacher level: with the reference they are S; without it they are T, and the
    dialogue reads as a lecture."""
    script = "TSTSTSTSTS"
    mic, played = lesson(script, voices, remote="S")
    result = analyse_talk(mic, RATE, role="main", reference=played, vad=vad)
    assert {s.source for s in result.spans if s.speaker == "S"} == {"loudspeaker"}
    _check(sample(result.spans, result.duration_s, interval_s=INTERVAL_S), script, "dialogue")
    blind = analyse_talk(mic, RATE, role="main", vad=vad)
    blind_st = analyse(sample(blind.spans, blind.duration_s, interval_s=INTERVAL_S))
    assert blind_st.mode == "lecture", blind_st


def test_the_stream_gives_the_whole_recordings_probabilities(
    voices: dict[str, np.ndarray], vad: SileroVad
) -> None:
    """The microphone arrives in blocks: fed in uneven pieces, the VAD's state carries
    over and the probabilities are those of the whole recording."""
    mic16 = resample(lesson("TS.T", voices)[0], RATE)
    whole = vad.probabilities(mic16)
    stream = vad.stream()
    cuts = np.cumsum(np.random.default_rng(1).integers(100, 2000, 200))
    pieces = np.split(mic16, cuts[cuts < len(mic16)])
    fed = np.concatenate([stream.feed(p) for p in pieces])
    assert len(fed) == len(whole) == len(mic16) // 512
    np.testing.assert_allclose(fed, whole, atol=1e-5)
    assert whole.max() > 0.9  # speech and silence are both there
    assert whole.min() < 0.1


def test_st_figures_and_modes_by_the_standard_thresholds() -> None:
    assert SAMPLE_INTERVAL_S == 30.0
    r = analyse("TTSSSTTS")
    assert (r.n, r.runs, r.rt, r.ch, r.mode) == (8, 4, 0.5, 3 / 8, "mixed")
    assert analyse("TTTSTTT").mode == "lecture"  # Rt 6/7
    assert analyse("SSSTSSSSSS").mode == "practice"  # Rt 0.1
    assert analyse("TSTSTS").mode == "dialogue"  # Rt 0.5, Ch 5/6
    assert analyse("TTTSSSS").mode == "mixed"  # Rt 3/7, Ch 1/7
    assert analyse("TTTSSSS").to_dict()["n_t"] == 3
    with pytest.raises(ValueError, match="T and S"):
        analyse("TX")


def test_cli_prints_the_sequence_and_mode(tmp_path: Path, voices: dict[str, np.ndarray]) -> None:
    script = "TSTSTS"
    mic, _ = lesson(script, voices)
    wav = tmp_path / "lesson.wav"
    write_wav(wav, mic, RATE)
    command = [sys.executable, "-m", "agent.cli", "sensing", "talk", str(wav), "--json"]
    run = subprocess.run(
        [*command, "--interval", str(INTERVAL_S)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["st"]["mode"] == "dialogue"
    assert sum(a != b for a, b in zip(out["st"]["samples"], script, strict=True)) <= 1
    assert all(
        set(s) == {"start_s", "end_s", "speaker", "source", "level_dbfs"} for s in out["spans"]
    )
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav")
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "sensing", "talk", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert "bad.wav: not a readable WAV file" in run.stderr

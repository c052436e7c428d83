"""Echo cancellation benchmark: each WebRTC-style audio processor on a simulated room.

Run from a checkout: ``.venv/bin/python bench/audio.py [--libraries pywebrtc,livekit,speex]
[--quick] [--seeds N]``. Needs Debian's ``espeak-ng``; livekit and speexdsp come with the
``compare`` extra (``pip install -e ".[compare]"``, after ``apt-get install swig
libspeexdsp-dev`` for speexdsp, which builds from source); a library that is not
installed is named and skipped.

The scene (agent/testkit/acoustics.py, synthetic and labelled so): espeak-ng far-end
speech through a synthetic room response (40 ms bulk delay, RT60 0.3 s) at -24 dBFS,
a near-end talker at -28 dBFS, white noise at -60 dBFS, the microphone clock 100 ppm
fast, and the echo path's delay jumping to 90 ms at 22 s. The reference is the played
signal, sample-aligned, so the canceller must find the acoustic delay itself (what the
daemon's stage leaves it after aligning by timestamps).

For each library, with echo cancellation alone (plus its high-pass filter):

* ERLE 2-12 s: echo power at the microphone over the output's, after 2 s of far end;
* converge: seconds until a 0.5 s window first reaches 20 dB ERLE; again after the jump;
* DT loss: how much of the near-end talker survives during double talk (least-squares
  gain of the clean talker in the output, per 20 ms frame), in dB below 0;
* latency: the lag of the output against the microphone (cross-correlation, near end
  alone): the algorithm's own delay. The stage adds no buffering (a 20 ms chunk is two
  10 ms frames processed at once), so this plus the CPU time of a frame is its latency;
* CPU: process CPU time (all threads: livekit runs its own) per 10 ms frame with every
  stage on (AEC, NS, HPF, AGC) as the daemon runs it, in % of one core.

The last rows are the daemon's own stage (``agent.capture.AudioProcessor``: the engine
plus the reference's timeline, the delay search and the health figures) without and
with its linear canceller ahead of AEC3 (``linear_canceller``), fed 20 ms chunks with
jittered stamps as the playback thread and the microphone hub make them; the lines
under the table give their spread over ``--seeds`` stamp-jitter seeds (AEC3 after a
delay jump depends on where the echo falls against its blocks).

``--far-end music`` plays synthetic music instead of speech (chords and a hi-hat:
tonal, wideband, no pauses). Then (not with ``--quick``) ERLE against the bulk delay,
to show what range each canceller handles unaided, and the double-talk loss against
the echo's level over the talker's (AEC3's suppressor takes more of the talker the
louder the echo is).
The machine is shared: CPU figures are noisy, compare within one run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

from agent.capture import AudioFormat, AudioProcessor, FarEndReference  # noqa: E402
from agent.config import AudioProcessingConfig  # noqa: E402
from agent.testkit.acoustics import (  # noqa: E402
    FAR_TEXT,
    NEAR_TEXT,
    Scene,
    classroom_scene,
    convergence_s,
    erle,
    kept_db,
    lag_samples,
    speech,
    synthetic_music,
    to_float,
    to_int16,
)

RATE = 48_000
FRAME = RATE // 100  # 10 ms
TARGETS = "targets: ERLE >= 25 dB after 2 s, DT loss <= 3 dB, latency <= 10 ms, CPU <= 5 %"


class Canceller(Protocol):
    def process(self, near: NDArray[np.int16], far: NDArray[np.int16]) -> NDArray[np.int16]: ...


class PyWebrtc:
    """pywebrtc-audio: WebRTC's APM (AEC3, NS, AGC2) built into the wheel."""

    def __init__(self, full: bool) -> None:
        import pywebrtc_audio  # noqa: PLC0415  (each library only if installed)

        self._ap = pywebrtc_audio.AudioProcessor(
            sample_rate=RATE,
            echo_cancellation=True,
            high_pass_filter=True,
            noise_suppression=full,
            auto_gain_control=full,
        )

    def process(self, near: NDArray[np.int16], far: NDArray[np.int16]) -> NDArray[np.int16]:
        out: NDArray[np.int16] = self._ap.process(near, far)
        return out


class LiveKit:
    """livekit: rtc.AudioProcessingModule (WebRTC's APM in the livekit-ffi Rust library)."""

    def __init__(self, full: bool) -> None:
        from livekit import rtc  # noqa: PLC0415

        self._rtc = rtc
        self._apm = rtc.AudioProcessingModule(
            echo_cancellation=True,
            high_pass_filter=True,
            noise_suppression=full,
            auto_gain_control=full,
        )

    def process(self, near: NDArray[np.int16], far: NDArray[np.int16]) -> NDArray[np.int16]:
        rtc = self._rtc
        ref = rtc.AudioFrame(bytearray(far.tobytes()), RATE, 1, FRAME)
        self._apm.process_reverse_stream(ref)
        mic = rtc.AudioFrame(bytearray(near.tobytes()), RATE, 1, FRAME)
        self._apm.set_stream_delay_ms(0)
        self._apm.process_stream(mic)
        return np.frombuffer(bytes(mic.data), np.int16).copy()


class Speex:
    """speexdsp: Speex's MDF echo canceller (no delay estimation: its filter must cover
    the bulk delay plus the tail, 300 ms here)."""

    def __init__(self, full: bool) -> None:
        from speexdsp import EchoCanceller  # noqa: PLC0415

        self._ec = EchoCanceller.create(FRAME, RATE * 300 // 1000, RATE)

    def process(self, near: NDArray[np.int16], far: NDArray[np.int16]) -> NDArray[np.int16]:
        out = self._ec.process(near.tobytes(), far.tobytes())
        return np.frombuffer(out, np.int16).copy()


LIBRARIES: dict[str, tuple[str, Callable[[bool], Canceller]]] = {
    "pywebrtc": ("pywebrtc-audio 0.2 (AEC3)", PyWebrtc),
    "livekit": ("livekit 1.2 rtc.APM (AEC3)", LiveKit),
    "speex": ("speexdsp 0.1 (MDF)", Speex),
}


@dataclass
class Result:
    label: str
    erle_db: float
    converge_s: float | None
    reconverge_s: float | None
    erle_after_db: float
    dt_loss_db: float
    near_alone_loss_db: float
    latency_ms: float
    cpu_percent: float
    note: str = ""


def run(canceller: Canceller, scene: Scene) -> tuple[NDArray[np.float32], float]:
    """The scene through ``canceller`` frame by frame; the output and CPU s per frame."""
    mic, far = to_int16(scene.mic), to_int16(scene.far)
    out = np.zeros_like(mic)
    frames = len(mic) // FRAME
    cpu0 = time.process_time()
    for i in range(frames):
        part = slice(i * FRAME, (i + 1) * FRAME)
        out[part] = canceller.process(mic[part], far[part])
    cpu = (time.process_time() - cpu0) / frames
    return to_float(out), cpu


def measure(key: str, scene: Scene) -> Result:
    label, factory = LIBRARIES[key]
    out, _ = run(factory(False), scene)
    _, cpu = run(factory(True), scene)
    return _result(label, scene, out, cpu)


def _result(label: str, scene: Scene, out: NDArray[np.float32], cpu: float) -> Result:
    near = scene.span("near_alone")
    lag = lag_samples(scene.mic[near], out[near], max_lag=RATE // 10)
    return Result(
        label=label,
        erle_db=erle(scene, out, slice(2 * RATE, 12 * RATE)),
        converge_s=convergence_s(scene, out, 0.0),
        reconverge_s=convergence_s(scene, out, scene.change_s, end_s=34.0),
        erle_after_db=erle(scene, out, slice(round((scene.change_s + 2) * RATE), 34 * RATE)),
        dt_loss_db=-kept_db(scene.near, out, scene.span("double_talk"), lag=lag),
        near_alone_loss_db=-kept_db(scene.near, out, near, lag=lag),
        latency_ms=1000 * lag / RATE,
        cpu_percent=100 * cpu / 0.010,
    )


def run_agent_stage(
    scene: Scene, config: AudioProcessingConfig, seed: int = 3
) -> tuple[NDArray[np.float32], float]:
    """The scene through the daemon's own stage (`AudioProcessor`: the engine plus the
    reference's timeline, the delay search and the health figures), 20 ms chunks with
    stamps as the playback thread and the microphone hub make them (jittered)."""
    chunk = 2 * FRAME
    reference = FarEndReference(RATE)
    stage = AudioProcessor(config, reference)
    fmt = AudioFormat(RATE, 1, chunk)
    mic, far = to_int16(scene.mic), to_int16(scene.far)
    out = np.zeros_like(mic)
    rng = np.random.default_rng(seed)
    t0 = time.monotonic_ns() + 1_000_000_000
    lead, period = 30, 20_000_000
    cpu = 0.0
    for k in range(-lead, len(mic) // chunk):
        j = k + lead
        block = far[j * chunk : (j + 1) * chunk]
        if len(block) < chunk:
            block = np.zeros(chunk, np.int16)
        stamp = t0 + j * period + round(rng.uniform(-3e6, 3e6))
        started = time.process_time()
        reference.push(block[:, None], RATE, stamp)
        if k >= 0:
            part = slice(k * chunk, (k + 1) * chunk)
            read_at = t0 + (k + 1) * period + round(rng.uniform(0, 4e6))
            out[part] = stage.process(mic[part][:, None], read_at, fmt)[:, 0]
        cpu += time.process_time() - started
    return to_float(out), cpu / (len(mic) // FRAME)


def _aec_only(linear: bool) -> AudioProcessingConfig:
    return AudioProcessingConfig(
        mode="on", noise_suppression=False, auto_gain_control=False, linear_canceller=linear
    )


def measure_agent_stage(scene: Scene, linear: bool) -> Result:
    out, _ = run_agent_stage(scene, _aec_only(linear))
    _, cpu = run_agent_stage(scene, AudioProcessingConfig(mode="on", linear_canceller=linear))
    label = "agent stage + linear" if linear else "agent stage (pywebrtc-audio)"
    return _result(label, scene, out, cpu)


def stage_over_seeds(scene: Scene, seeds: int, linear: bool) -> None:
    """The stage's figures over stamp-jitter seeds: AEC3's behaviour after a delay jump
    depends on where the echo falls against its blocks, so one seed can mislead."""
    after, dt = [], []
    for seed in range(seeds):
        out, _ = run_agent_stage(scene, _aec_only(linear), seed)
        after.append(erle(scene, out, slice(round((scene.change_s + 2) * RATE), 34 * RATE)))
        near = scene.span("near_alone")
        lag = lag_samples(scene.mic[near], out[near], max_lag=RATE // 10)
        dt.append(-kept_db(scene.near, out, scene.span("double_talk"), lag=lag))
    print(
        f"{'agent stage + linear' if linear else 'agent stage'} over {seeds} stamp seeds: "
        f"ERLE after the jump min {min(after):.1f} / "
        f"median {float(np.median(after)):.1f} / max {max(after):.1f} dB; DT loss min "
        f"{min(dt):.1f} / median {float(np.median(dt)):.1f} / max {max(dt):.1f} dB"
    )


def double_talk_sweep(levels: list[float], far: Any, near: Any) -> None:
    """Near-end loss in double talk against the echo's level over the talker's."""
    print("\nDouble-talk loss against the echo's level over the talker's (AEC3, raw):")
    print(f"{'echo - talker':<28}" + "".join(f"{d:>+9.0f} dB" for d in levels))
    row, erles = [], []
    for diff in levels:
        scene = classroom_scene(echo_dbfs=-28.0 + diff, near_dbfs=-28.0, far=far, near=near)
        out, _ = run(PyWebrtc(False), scene)
        near_span = scene.span("near_alone")
        lag = lag_samples(scene.mic[near_span], out[near_span], max_lag=RATE // 10)
        row.append(-kept_db(scene.near, out, scene.span("double_talk"), lag=lag))
        erles.append(erle(scene, out, slice(2 * RATE, 12 * RATE)))
    print(f"{'DT loss':<28}" + "".join(f"{v:>9.1f} dB" for v in row))
    print(f"{'ERLE 2-12 s':<28}" + "".join(f"{v:>9.1f} dB" for v in erles))


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def print_table(results: list[Result]) -> None:
    head = (
        f"{'library':<28} {'ERLE 2-12s':>10} {'converge':>9} {'after jump':>10} "
        f"{'ERLE after':>10} {'DT loss':>8} {'near loss':>9} {'latency':>8} {'CPU':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.label:<28} {r.erle_db:>7.1f} dB {_s(r.converge_s):>9} "
            f"{_s(r.reconverge_s):>10} {r.erle_after_db:>7.1f} dB {r.dt_loss_db:>5.1f} dB "
            f"{r.near_alone_loss_db:>6.1f} dB {r.latency_ms:>5.1f} ms {r.cpu_percent:>5.2f} %"
        )
    print(TARGETS)


def delay_sweep(keys: list[str], delays: list[float], far: Any, near: Any) -> None:
    print("\nERLE 2-12 s against the echo path's bulk delay (reference sample-aligned):")
    print(f"{'library':<28}" + "".join(f"{d:>9.0f} ms" for d in delays))
    for key in keys:
        label, factory = LIBRARIES[key]
        row = []
        for delay in delays:
            scene = classroom_scene(delay_ms=delay, changed_delay_ms=delay, far=far, near=near)
            out, _ = run(factory(False), scene)
            row.append(erle(scene, out, slice(2 * RATE, 12 * RATE)))
        print(f"{label:<28}" + "".join(f"{v:>9.1f} dB" for v in row))


def available(key: str) -> str | None:
    """None when the library imports, else why not."""
    module = {"pywebrtc": "pywebrtc_audio", "livekit": "livekit.rtc", "speex": "speexdsp"}[key]
    try:
        __import__(module)
    except ImportError as exc:
        return f"not installed ({exc})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", default="pywebrtc,livekit,speex")
    parser.add_argument("--quick", action="store_true", help="skip the sweeps")
    parser.add_argument("--delays", default="20,100,200,300,450")
    parser.add_argument("--echo-dbfs", type=float, default=-24.0, help="echo at the mic")
    parser.add_argument("--near-dbfs", type=float, default=-28.0, help="near-end talker")
    parser.add_argument("--seeds", type=int, default=8, help="stamp seeds for the stage")
    parser.add_argument("--delay-ms", type=float, default=40.0, help="echo path delay")
    parser.add_argument("--jump-to-ms", type=float, default=90.0, help="its delay from 22 s")
    parser.add_argument(
        "--dt-levels", default="-12,-6,0,4,8", help="echo over talker (dB) for the DT sweep"
    )
    parser.add_argument(
        "--far-end",
        choices=("speech", "music"),
        default="speech",
        help="what the loudspeakers play: espeak-ng speech, or synthetic music (chords and "
        "a hi-hat, agent/testkit/acoustics.py)",
    )
    args = parser.parse_args()
    # The stage logs each realignment (the scene's delay jump): the table says it.
    logging.getLogger("agent").setLevel(logging.ERROR)
    keys = []
    for key in args.libraries.split(","):
        why = available(key)
        if why is None:
            keys.append(key)
        else:
            print(f"{key}: {why}")
    scene = classroom_scene(
        echo_dbfs=args.echo_dbfs,
        near_dbfs=args.near_dbfs,
        delay_ms=args.delay_ms,
        changed_delay_ms=args.jump_to_ms,
        far=synthetic_music() if args.far_end == "music" else None,
    )
    print(
        f"simulated room: far end {args.far_end}, "
        f"echo {args.echo_dbfs:g} dBFS, talker {args.near_dbfs:g} dBFS, "
        f"delay {scene.delays_ms[0]:.0f} ms -> {scene.delays_ms[1]:.0f} ms at "
        f"{scene.change_s:.0f} s, mic clock +100 ppm, 48 kHz mono, 10 ms frames "
        "(shared machine: CPU figures are noisy)\n"
    )
    results = [measure(key, scene) for key in keys]
    if "pywebrtc" in keys:
        results.append(measure_agent_stage(scene, linear=False))
        results.append(measure_agent_stage(scene, linear=True))
    print_table(results)
    if "pywebrtc" in keys and args.seeds > 0:
        stage_over_seeds(scene, args.seeds, linear=False)
        stage_over_seeds(scene, args.seeds, linear=True)
    if not args.quick:
        delays = [float(d) for d in args.delays.split(",")]
        far, near = speech(FAR_TEXT), speech(NEAR_TEXT, voice="en-gb+f3", wpm=165)
        delay_sweep(keys, delays, far, near)
        if "pywebrtc" in keys:
            double_talk_sweep([float(d) for d in args.dt_levels.split(",")], far, near)


if __name__ == "__main__":
    main()

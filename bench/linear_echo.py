"""The stage's linear echo canceller (agent/capture/linear_echo.py) ahead of AEC3, alone.

Run from a checkout: ``.venv/bin/python bench/linear_echo.py [--levels -12,-6,0,4,8]
[--modes aec3,gated] [--ppm 100] [--delay-ms 40]``. Needs Debian's ``espeak-ng``.
Prints, for the simulated room of ``bench/audio.py`` at each echo-over-talker level,
AEC3 alone and AEC3 behind the linear stage (engaged once it removes 12 dB), with the
reference sample-aligned and the filter's window fixed 35 ms after it (where the
daemon's realignment puts the echo 40 ms after its reference), echo cancellation alone:

* ERLE 2-12 s, ERLE 24-34 s (after the scene's delay jump at 22 s; the linear stage and
  AEC3 start afresh at 24 s with the filter window moved by the 50 ms, as the daemon's
  realignment would, the linear stage keeping its drift estimate), the worst 1 s window
  from 24 s, the double-talk loss, when the gate opened (from the start and after the
  restart), the drift found, and the CPU of the linear stage and of AEC3 in % of one core
  at 48 kHz / 10 ms frames.

The daemon's own stage with it (timeline, delay search, window placement, health) is
measured by ``bench/audio.py``. The first version of this canceller (Speex's MDF learning
rate) needed 6-7 s of far-end speech to remove 12 dB and over 10 s after a restart, at
3.1-3.6 % of a core; per-bin normalisation already whitens the reference across bins, so
pre-emphasis or LPC would not help it, and larger MDF steps changed little: the step
shared by the partitions limited it. The diagonal Kalman update replaced it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a script in a checkout: the package may not be installed

import pywebrtc_audio  # noqa: E402

from agent.capture.linear_echo import LinearCanceller  # noqa: E402
from agent.testkit.acoustics import (  # noqa: E402
    FAR_TEXT,
    NEAR_TEXT,
    Scene,
    classroom_scene,
    erle,
    erle_windows,
    kept_db,
    lag_samples,
    speech,
    to_float,
    to_int16,
)

RATE = 48_000
N = RATE // 100  # 10 ms partitions and frames
Floats = NDArray[np.float64]


@dataclass
class Run:
    out: Floats
    linear_cpu: float  # s per frame
    aec_cpu: float  # s per frame
    engaged_s: list[float]  # when the gate opened (from the start, and after the restart)
    drift: float


def run(scene: Scene, mode: str) -> Run:
    """The scene through [linear stage, then] AEC3.
    ``mode``: 'aec3' or 'gated' (engaged once it removes 12 dB)."""
    mic = scene.mic.astype(np.float32) * 32768
    far = scene.far.astype(np.float32) * 32768
    far16 = to_int16(scene.far)
    aec = pywebrtc_audio.EchoCanceller(sample_rate=RATE, num_channels=1)
    base = round(0.035 * RATE)
    linear = LinearCanceller(RATE, N, base) if mode != "aec3" else None
    out = np.zeros(len(mic), np.int16)
    cpu = aec_cpu = 0.0
    engaged: list[float] = []
    frames = len(mic) // N
    for f in range(frames):
        part = slice(f * N, (f + 1) * N)
        d = mic[part]
        if f * N == round((scene.change_s + 2) * RATE):
            # The daemon realigns ~2 s after a jump and starts the canceller afresh; the
            # linear stage keeps its drift estimate.
            aec.reset()
            if linear is not None:
                jump = round((scene.delays_ms[1] - scene.delays_ms[0]) * RATE / 1000)
                linear = linear.restarted(base + jump)
        if linear is not None:
            started = time.process_time()
            was = linear.engaged
            d = linear.process(d, far[part])
            if linear.engaged and not was:
                engaged.append(f * N / RATE)
            if was and not linear.engaged:
                aec.reset()  # as the stage does: the echo path moved under the filter
            cpu += time.process_time() - started
        near = np.clip(np.round(d), -32768, 32767).astype(np.int16)
        started = time.process_time()
        out[part] = aec.process(near, far16[part])
        aec_cpu += time.process_time() - started
    drift = linear.drift if linear is not None else 0.0
    return Run(to_float(out).astype(np.float64), cpu / frames, aec_cpu / frames, engaged, drift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="-12,-6,0,4,8", help="echo over talker, dB")
    parser.add_argument("--modes", default="aec3,gated", help="variants to run")
    parser.add_argument("--ppm", type=float, default=100.0, help="microphone clock drift")
    parser.add_argument("--delay-ms", type=float, default=40.0, help="echo path delay")
    args = parser.parse_args()
    far, near = speech(FAR_TEXT), speech(NEAR_TEXT, voice="en-gb+f3", wpm=165)
    print(
        f"simulated room: delay {args.delay_ms:g} ms -> {args.delay_ms + 50:g} ms at 22 s, "
        f"mic clock {args.ppm:+g} ppm; CPU in % of one core (shared machine: noisy)"
    )
    head = (
        f"{'echo - talker':>13} {'variant':<7} {'ERLE 2-12':>9} {'ERLE 24-34':>10} "
        f"{'worst 1 s':>9} {'DT loss':>7} {'engaged at':>11} {'drift':>9} "
        f"{'CPU lin':>7} {'AEC3':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for level in (float(v) for v in args.levels.split(",")):
        scene = classroom_scene(
            echo_dbfs=-28.0 + level,
            near_dbfs=-28.0,
            far=far,
            near=near,
            drift_ppm=args.ppm,
            delay_ms=args.delay_ms,
            changed_delay_ms=args.delay_ms + 50,
        )
        for mode in args.modes.split(","):
            result = run(scene, mode)
            out = result.out.astype(np.float32)
            span = scene.span("near_alone")
            lag = lag_samples(scene.mic[span], out[span], max_lag=RATE // 10)
            after = slice(round((scene.change_s + 2) * RATE), 34 * RATE)
            worst = min(v for _, v in erle_windows(scene, out, after, window_s=1.0))
            loss = -kept_db(scene.near, out, scene.span("double_talk"), lag=lag)
            first = erle(scene, out, slice(2 * RATE, 12 * RATE))
            when = ",".join(f"{t:.1f}" for t in result.engaged_s) or "-"
            print(
                f"{level:>+10.0f} dB {mode:<7} {first:>6.1f} dB {erle(scene, out, after):>7.1f} "
                f"dB {worst:>6.1f} dB {loss:>4.1f} dB {when:>11} {1e6 * result.drift:>5.0f} ppm "
                f"{100 * result.linear_cpu / 0.010:>5.2f} % {100 * result.aec_cpu / 0.010:>4.2f} %",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Experiment, not used by the daemon: a linear echo canceller of our own ahead of AEC3.

Run from a checkout: ``.venv/bin/python bench/linear_echo.py [--levels -12,-6,0,4,8]
[--modes aec3,always,gated] [--ppm 100] [--delay-ms 40]``. Needs Debian's ``espeak-ng``.
Prints, for the simulated room of ``bench/audio.py`` at each echo-over-talker level, AEC3
alone and AEC3 behind the linear stage (always engaged, and engaged only once it removes
12 dB), sample-aligned reference, echo cancellation alone:

* ERLE 2-12 s, ERLE 24-34 s (after the scene's delay jump at 22 s; the linear stage and
  AEC3 start afresh at 24 s with the filter window moved by the 50 ms, as the daemon's
  realignment would, the linear stage keeping its drift estimate), the worst 1 s window
  from 24 s, the double-talk loss, when the gate opened (from the start and after the
  restart), the drift found, and the CPU of the linear stage and of AEC3 in % of one core
  at 48 kHz / 10 ms frames.

The linear stage: a two-path (foreground/background) partitioned-block frequency-domain
filter, 10 ms partitions, 160 ms window from 35 ms after the reference, adapted below
8 kHz only (AEC3's own linear filter stops there too; above it AEC3 suppresses), in
float32/complex64. The background adapts as a diagonal frequency-domain Kalman filter
(per partition and bin, the gain is the state's uncertainty over the innovation's
variance: large while unsure, small in double talk, when the error PSD rises); Speex's
two-path test copies it to the output when it does better and back when it diverges.
Clock drift: every 0.5 s the foreground filter's phase against its previous snapshot
gives how far the echo moved, and the reference is resampled (windowed-sinc fractional
delay) by the estimated clock ratio so the path the filter sees stands still.

The first version (Speex's MDF learning rate) needed 6-7 s of far-end speech to remove
12 dB and over 10 s after a restart, at 3.1-3.6 % of a core; per-bin normalisation
already whitens the reference across bins, so pre-emphasis or LPC would not help it,
and larger MDF steps changed little: what limited it was the step shared by the
partitions. Figures of this version: README, audio section.
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
PARTITIONS = 16  # 160 ms
Floats = NDArray[np.float64]
Spectra = NDArray[np.complex64]


def _sinc_table(taps: int = 24, phases: int = 1024) -> tuple[Floats, NDArray[np.int64]]:
    """Kaiser-windowed sinc fractional-delay filters, one row per 1/``phases`` sample."""
    half = taps // 2
    offsets = np.arange(-half + 1, half + 1)
    x = offsets[None, :] - (np.arange(phases + 1) / phases)[:, None]
    window = np.interp(x, np.linspace(-half, half, taps + 1), np.kaiser(taps + 1, 8.0))
    table = np.sinc(x) * window
    table /= table.sum(axis=1, keepdims=True)
    return table, offsets.astype(np.int64)


_TABLE, _OFFSETS = _sinc_table()


class LinearCanceller:
    """Two-path partitioned-block Kalman canceller with drift compensation (see the
    module docstring). float32/complex64, bins up to ``top_hz`` only."""

    def __init__(
        self,
        partitions: int,
        delay: int,
        drift: float = 0.0,
        *,
        top_hz: float = 8000.0,
        p0: float = 10.0,
        smooth: float = 0.8,
        a: float = 0.9999,
    ) -> None:
        self.m = m = partitions
        self.k = k = round(top_hz * 2 * N / RATE) + 1
        self.delay = delay  # reference samples before the filter's first tap
        self.drift = drift  # reference samples per microphone sample, minus one
        self.phase = 0.0  # accumulated reference offset from the drift
        self.a = a  # the state's transition factor (how fast the path may change)
        self.smooth = smooth  # the error PSD's smoothing (the observation noise)
        self.x = np.zeros((m, k), np.complex64)  # reference spectra, newest first
        self.x2 = np.zeros((m, k), np.float32)  # their powers
        self.w2 = np.zeros((2, m, k), np.complex64)  # background (adapting), foreground
        self.p = np.full((m, k), p0, np.float32)  # the background's state uncertainty
        self.psi = np.zeros(k, np.float32)
        self.power = np.zeros(k, np.float32)  # the reference's long-term PSD (drift weights)
        self.window = np.zeros(2 * N, np.float32)
        self.pad = np.zeros(2 * N, np.float32)
        self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
        self.count = 0
        self.snapshot: Spectra | None = None
        self.snapshot_at = 0
        self.mic_power = 0.0
        self.out_power = 0.0
        self.engaged = False
        bins = np.arange(k)
        self.signs = (np.where(bins % 2 == 0, 1.0, -1.0)[None, :] ** np.arange(m)[:, None]).astype(
            np.float32
        )
        hz = bins * RATE / (2 * N)
        self.band = (hz > 150) & (hz < 2500)
        self.omega = np.pi * bins[self.band] / N
        self.steps = np.arange(N)

    def reference(self, far: Floats, n0: int) -> Floats:
        """The frame's reference: ``far`` at ``n - delay + phase(n)``, interpolated."""
        pos = n0 + self.steps - self.delay + self.phase + self.drift * self.steps
        self.phase += self.drift * N
        whole = np.floor(pos)
        rows = np.rint((pos - whole) * (len(_TABLE) - 1)).astype(np.int64)
        index = whole.astype(np.int64)[:, None] + _OFFSETS[None, :]
        np.clip(index, 0, len(far) - 1, out=index)
        out: Floats = np.einsum("ij,ij->i", far[index], _TABLE[rows])
        return out

    def process(self, d: Floats, x: Floats) -> Floats:
        """One frame of microphone ``d`` and reference ``x`` (int16 scale); the error."""
        self.window[:N] = self.window[N:]
        self.window[N:] = x
        spectrum = np.fft.rfft(self.window)[: self.k].astype(np.complex64)
        self.x[1:] = self.x[:-1]
        self.x[0] = spectrum
        self.x2[1:] = self.x2[:-1]
        self.x2[0] = spectrum.real**2 + spectrum.imag**2
        y2 = np.fft.irfft(np.einsum("mk,pmk->pk", self.x, self.w2), 2 * N)[:, N:]
        e2 = d.astype(np.float32) - y2
        y, yf = y2
        e, ef = e2
        see, sff = (float(v) for v in np.einsum("pn,pn->p", e2, e2))
        dy = y - yf
        dbf = float(dy @ dy) + 1.0
        diff = sff - see
        self.davg1 = 0.6 * self.davg1 + 0.4 * diff
        self.davg2 = 0.85 * self.davg2 + 0.15 * diff
        self.dvar1 = 0.36 * self.dvar1 + 0.16 * sff * dbf
        self.dvar2 = 0.7225 * self.dvar2 + 0.0225 * sff * dbf
        if (
            diff * abs(diff) > sff * dbf
            or self.davg1 * abs(self.davg1) > 0.5 * self.dvar1
            or self.davg2 * abs(self.davg2) > 0.25 * self.dvar2
        ):
            self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
            self.w2[1] = self.w2[0]  # the background does better: it becomes the output
            ef = e
        elif -diff * abs(diff) > 4 * sff * dbf:
            self.w2[0] = self.w2[1]  # the background diverged (double talk): back to the output
            self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
            e = ef
        self._adapt(e)
        self.count += 1
        self._track_drift()
        out: Floats = ef.astype(np.float64)
        return out

    def _adapt(self, e: NDArray[np.float32]) -> None:
        """The Kalman update, diagonal per partition and bin: the gain is the state's
        uncertainty over the innovation's variance (echo estimate's uncertainty plus
        the smoothed error PSD), so it steps large while unsure and small in double talk."""
        if self.count:
            self.power *= 0.99
            self.power += 0.01 * self.x2[0]
        else:
            self.power[:] = self.x2[0]
        self.pad[N:] = e
        err = np.fft.rfft(self.pad)[: self.k].astype(np.complex64)
        self.psi *= self.smooth
        self.psi += (1 - self.smooth) * (err.real**2 + err.imag**2)
        px = self.p * self.x2
        mu = self.p / (px.sum(axis=0) + 2 * self.psi + 1e-3)
        w = self.w2[0]
        w += (mu * err) * np.conj(self.x)
        rows = [0, 1 + self.count % (self.m - 1)]  # two partitions constrained a frame
        taps = np.fft.irfft(w[rows], 2 * N)
        taps[:, N:] = 0
        w[rows] = np.fft.rfft(taps)[:, : self.k]
        a2 = self.a * self.a
        self.p -= 0.5 * mu * px
        self.p *= a2
        self.p += (1 - a2) * (w.real**2 + w.imag**2)
        w *= self.a

    def _track_drift(self) -> None:
        """Every 0.5 s: how far the foreground's echo moved since the last snapshot
        (weighted phase slope, 150 Hz-2.5 kHz), folded into the drift estimate."""
        if self.count % 50:
            return
        response = np.einsum("mk,mk->k", self.w2[1], self.signs)
        if self.snapshot is not None:
            cross = response[self.band] * np.conj(self.snapshot[self.band])
            weight = np.abs(cross) * self.power[self.band]
            moved = -float(np.sum(weight * np.angle(cross) * self.omega)) / float(
                np.sum(weight * self.omega**2) + 1e-12
            )
            self.drift -= 0.5 * moved / ((self.count - self.snapshot_at) * N)
        self.snapshot = response
        self.snapshot_at = self.count


@dataclass
class Run:
    out: Floats
    linear_cpu: float  # s per frame
    aec_cpu: float  # s per frame
    engaged_s: list[float]  # when the gate opened (from the start, and after the restart)
    drift: float


def run(scene: Scene, mode: str, engage_db: float = 12.0) -> Run:
    """The scene through [linear stage, then] AEC3.
    ``mode``: 'aec3', 'always' or 'gated' (engaged once it removes ``engage_db``)."""
    mic = scene.mic.astype(np.float64) * 32768
    far = scene.far.astype(np.float64) * 32768
    far16 = to_int16(scene.far)
    aec = pywebrtc_audio.EchoCanceller(sample_rate=RATE, num_channels=1)
    base = round(0.035 * RATE)
    linear = LinearCanceller(PARTITIONS, base) if mode != "aec3" else None
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
                linear = LinearCanceller(PARTITIONS, base + jump, linear.drift)
        if linear is not None:
            started = time.process_time()
            e = linear.process(d, linear.reference(far, f * N))
            linear.mic_power = 0.99 * linear.mic_power + 0.01 * float(d @ d)
            linear.out_power = 0.99 * linear.out_power + 0.01 * float(e @ e)
            if not linear.engaged and (
                mode == "always"
                or (
                    linear.mic_power > 1e6
                    and linear.mic_power > 10 ** (engage_db / 10) * linear.out_power
                )
            ):
                linear.engaged = True
                engaged.append(f * N / RATE)
            if linear.engaged:
                d = e
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
    parser.add_argument("--modes", default="aec3,always,gated", help="variants to run")
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

"""Experiment, not used by the daemon: a linear echo canceller of our own ahead of AEC3.

Run from a checkout: ``.venv/bin/python bench/linear_echo.py [--levels -12,-6,0,4,8]``.
Needs Debian's ``espeak-ng``. Prints, for the simulated room of ``bench/audio.py`` at
each echo-over-talker level, AEC3 alone and AEC3 behind the linear stage (always
engaged, and engaged only once it removes 12 dB), sample-aligned reference, echo
cancellation alone:

* ERLE 2-12 s, ERLE 24-34 s (after the scene's delay jump at 22 s; the linear stage and
  AEC3 start afresh at 24 s with the filter window moved by the 50 ms, as the daemon's
  realignment would), the worst 1 s window from 24 s, the double-talk loss, and the
  linear stage's CPU in % of one core at 48 kHz / 10 ms frames.

The linear stage: a two-path (foreground/background) partitioned-block frequency-domain
adaptive filter (Speex's MDF: 10 ms partitions, per-bin learning rate from the echo
estimate's leakage, which slows it in double talk), 160 ms window from 35 ms after the
reference, and clock-drift compensation: every 0.5 s the foreground filter's phase
against its previous snapshot gives how far the echo moved, and the reference is
resampled (windowed-sinc fractional delay) by the estimated clock ratio so the path the
filter sees stands still (it finds the scene's 100 ppm within a few seconds).

Why the stage does not use it (README, audio section): the double-talk loss falls to
1.2-2.3 dB, but the filter needs about ten seconds of speech to reach 20 dB in this
reverberant room, and AEC3 behind a filter that is still moving loses ERLE; engaged only
once converged it keeps ERLE before the jump, but after a jump it dips to 17-20 dB, and
its CPU (3-4 % of a core alone) would take the stage past 5 %.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
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
BINS = N + 1
Floats = NDArray[np.float64]
Spectra = NDArray[np.complex128]


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
    """Two-path MDF with drift compensation (see the module docstring)."""

    def __init__(self, partitions: int, delay: int, drift: float = 0.0) -> None:
        self.m = partitions
        self.delay = delay  # reference samples before the filter's first tap
        self.drift = drift  # reference samples per microphone sample, minus one
        self.phase = 0.0  # accumulated reference offset from the drift
        self.x = np.zeros((partitions, BINS), np.complex128)
        self.w = np.zeros((partitions, BINS), np.complex128)  # background (adapting)
        self.wf = np.zeros((partitions, BINS), np.complex128)  # foreground (output)
        self.x_prev = np.zeros(N)
        self.power = np.zeros(BINS)
        self.eh = np.zeros(BINS)
        self.yh = np.zeros(BINS)
        self.pey = 1.0
        self.pyy = 1.0
        self.adapted = False
        self.sum_adapt = 0.0
        self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
        self.count = 0
        self.snapshot: Spectra | None = None
        self.snapshot_at = 0
        self.mic_power = 0.0
        self.out_power = 0.0
        self.engaged = False

    def reference(self, far: Floats, n0: int) -> Floats:
        """The frame's reference: ``far`` at ``n - delay + phase(n)``, interpolated."""
        steps = np.arange(N)
        pos = n0 + steps - self.delay + self.phase + self.drift * steps
        self.phase += self.drift * N
        whole = np.floor(pos).astype(np.int64)
        rows = np.round((pos - whole) * (len(_TABLE) - 1)).astype(np.int64)
        index = np.clip(whole[:, None] + _OFFSETS[None, :], 0, len(far) - 1)
        out: Floats = np.sum(far[index] * _TABLE[rows], axis=1)
        return out

    def process(self, d: Floats, x: Floats) -> Floats:
        """One frame of microphone ``d`` and reference ``x`` (int16 scale); the error."""
        spectrum = np.fft.rfft(np.concatenate([self.x_prev, x]))
        self.x_prev = x
        self.x[1:] = self.x[:-1]
        self.x[0] = spectrum
        y = np.fft.irfft(np.einsum("mk,mk->k", self.x, self.w))[N:]
        yf = np.fft.irfft(np.einsum("mk,mk->k", self.x, self.wf))[N:]
        e, ef = d - y, d - yf
        sff, see = float(ef @ ef), float(e @ e)
        dbf = float((y - yf) @ (y - yf)) + 1.0
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
            self.wf[:] = self.w  # the background does better: it becomes the output
            ef = e
        elif -diff * abs(diff) > 4 * sff * dbf:
            self.w[:] = self.wf  # the background diverged (double talk): back to the output
            self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
            e, y, see = ef, yf, sff
        self._adapt(x, spectrum, e, y, see)
        self.count += 1
        self._track_drift()
        return ef

    def _adapt(self, x: Floats, spectrum: Spectra, e: Floats, y: Floats, see: float) -> None:
        """Speex's learning rate: per bin, the residual echo (the echo estimate times the
        leakage) over the error's power, so double talk slows the filter."""
        pad = np.zeros(N)
        err = np.fft.rfft(np.concatenate([pad, e]))
        rf = np.abs(err) ** 2
        yp = np.abs(np.fft.rfft(np.concatenate([pad, y]))) ** 2
        sxx, syy, sey = float(x @ x), float(y @ y), float(e @ y)
        xp = np.abs(spectrum) ** 2
        self.power = 0.99 * self.power + 0.01 * xp if self.count else xp
        eh, yh = rf - self.eh, yp - self.yh
        pyy = math.sqrt(float(yh @ yh)) + 1e-9
        pey = float(eh @ yh) / pyy
        self.eh = 0.99 * self.eh + 0.01 * rf
        self.yh = 0.99 * self.yh + 0.01 * yp
        alpha = min(0.02 * syy, 0.005 * see) / (see + 1e-9)
        self.pey = (1 - alpha) * self.pey + alpha * pey
        self.pyy = max(1.0, (1 - alpha) * self.pyy + alpha * pyy)
        self.pey = min(max(self.pey, 0.005 * self.pyy), self.pyy)
        leak = self.pey / self.pyy
        rer = min(0.5, max((1e-4 * sxx + 3 * leak * syy) / (see + 1), sey**2 / (1 + see * syy)))
        if not self.adapted and self.sum_adapt > self.m and leak > 0.03:
            self.adapted = True
        if self.adapted:
            ee = rf + 1
            r = 0.7 * np.minimum(leak * yp, 0.5 * ee) + 0.3 * rer * ee
            step = r / ee / (self.power + 10)
        else:
            rate = min(0.25 * sxx, 0.25 * see) / (see + 1) if sxx > N * 1000 else 0.0
            step = rate / (self.power + 10)
            self.sum_adapt += rate
        norms = np.sqrt(np.sum(np.abs(self.w) ** 2, axis=1))
        prop = norms + 0.1 * norms.max() + 1e-9
        prop *= 0.99 / prop.sum()
        self.w += np.conj(self.x) * (step * err)[None, :] * prop[:, None]
        for j in (0, 1 + self.count % (self.m - 1)):  # AUMDF: two partitions constrained
            taps = np.fft.irfft(self.w[j])
            taps[N:] = 0
            self.w[j] = np.fft.rfft(taps)

    def _track_drift(self) -> None:
        """Every 0.5 s: how far the foreground's echo moved since the last snapshot
        (weighted phase slope, 150 Hz-2.5 kHz), folded into the drift estimate."""
        if self.count % 50 or not self.adapted:
            return
        k = np.arange(BINS)
        signs = np.where(k % 2 == 0, 1.0, -1.0)[None, :] ** np.arange(self.m)[:, None]
        response = np.sum(self.wf * signs, axis=0)
        if self.snapshot is not None:
            band = (k * RATE / (2 * N) > 150) & (k * RATE / (2 * N) < 2500)
            cross = response[band] * np.conj(self.snapshot[band])
            weight = np.abs(cross) * self.power[band]
            omega = np.pi * k[band] / N
            moved = -float(np.sum(weight * np.angle(cross) * omega)) / float(
                np.sum(weight * omega**2) + 1e-12
            )
            self.drift -= 0.5 * moved / ((self.count - self.snapshot_at) * N)
        self.snapshot = response
        self.snapshot_at = self.count


def run(scene: Scene, mode: str, engage_db: float = 12.0) -> tuple[Floats, float]:
    """The scene through [linear stage, then] AEC3; output and linear CPU s per frame.
    ``mode``: 'aec3', 'always' or 'gated' (engaged once it removes ``engage_db``)."""
    mic = scene.mic.astype(np.float64) * 32768
    far = scene.far.astype(np.float64) * 32768
    far16 = to_int16(scene.far)
    aec = pywebrtc_audio.EchoCanceller(sample_rate=RATE, num_channels=1)
    base = round(0.035 * RATE)
    linear = LinearCanceller(16, base) if mode != "aec3" else None
    out = np.zeros(len(mic), np.int16)
    cpu = 0.0
    frames = len(mic) // N
    for f in range(frames):
        part = slice(f * N, (f + 1) * N)
        d = mic[part]
        if f * N == round((scene.change_s + 2) * RATE):
            # The daemon realigns ~2 s after a jump and starts the canceller afresh.
            aec.reset()
            if linear is not None:
                jump = round((scene.delays_ms[1] - scene.delays_ms[0]) * RATE / 1000)
                linear = LinearCanceller(16, base + jump, linear.drift)
        if linear is not None:
            started = time.process_time()
            e = linear.process(d, linear.reference(far, f * N))
            linear.mic_power = 0.99 * linear.mic_power + 0.01 * float(d @ d)
            linear.out_power = 0.99 * linear.out_power + 0.01 * float(e @ e)
            if mode == "always" or (
                linear.mic_power > 1e6
                and linear.mic_power > 10 ** (engage_db / 10) * linear.out_power
            ):
                linear.engaged = True
            if linear.engaged:
                d = e
            cpu += time.process_time() - started
        near = np.clip(np.round(d), -32768, 32767).astype(np.int16)
        out[part] = aec.process(near, far16[part])
    return to_float(out).astype(np.float64), cpu / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="-12,-6,0,4,8", help="echo over talker, dB")
    args = parser.parse_args()
    far, near = speech(FAR_TEXT), speech(NEAR_TEXT, voice="en-gb+f3", wpm=165)
    head = (
        f"{'echo - talker':>13} {'variant':<16} {'ERLE 2-12':>9} {'ERLE 24-34':>10} "
        f"{'worst 1 s':>9} {'DT loss':>7} {'CPU':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for level in (float(v) for v in args.levels.split(",")):
        scene = classroom_scene(echo_dbfs=-28.0 + level, near_dbfs=-28.0, far=far, near=near)
        for mode in ("aec3", "always", "gated"):
            out32, cpu = run(scene, mode)
            out = out32.astype(np.float32)
            span = scene.span("near_alone")
            lag = lag_samples(scene.mic[span], out[span], max_lag=RATE // 10)
            after = slice(round((scene.change_s + 2) * RATE), 34 * RATE)
            worst = min(v for _, v in erle_windows(scene, out, after, window_s=1.0))
            loss = -kept_db(scene.near, out, scene.span("double_talk"), lag=lag)
            first = erle(scene, out, slice(2 * RATE, 12 * RATE))
            print(
                f"{level:>+10.0f} dB {mode:<16} {first:>6.1f} "
                f"dB {erle(scene, out, after):>7.1f} dB {worst:>6.1f} dB {loss:>4.1f} dB "
                f"{100 * cpu / 0.010:>4.1f} %"
            )


if __name__ == "__main__":
    main()

"""A linear echo canceller ahead of AEC3, engaged only once it has converged.

AEC3's residual echo suppressor takes 5.5 dB of a talker who speaks over a loud echo
(the bench's scene: echo 4 dB over the talker at the microphone); its settings are not
exposed. A linear filter that removes most of the echo first leaves the suppressor
little to do, and the talker keeps all but 1.4-2.7 dB (``bench/linear_echo.py``).

* A two-path partitioned-block frequency-domain filter (10 ms partitions, 160 ms
  window placed from 5 ms before the measured echo), adapted below 8 kHz (AEC3's own
  linear filter stops there too; above it AEC3 suppresses), float32/complex64.
* The background adapts as a diagonal frequency-domain Kalman filter: per partition
  and bin the gain is the state's uncertainty over the innovation's variance, large
  while unsure (about 3 s of far-end speech to remove 12 dB) and small in double talk,
  when the error rises. Speex's two-path test copies it to the output (foreground) when
  it does better, and back when it diverges.
* Clock drift: every 0.5 s the foreground's phase against its previous snapshot gives
  how far the echo moved; the reference is read from its history at a position that
  moves by the estimated clock ratio (windowed-sinc fractional delay), so the path the
  filter sees stands still. A restart (a realignment, the window moved) keeps the estimate.
* The gate: its output replaces the microphone only once it removes 12 dB below 8 kHz
  (the band it models; AEC3 behind a filter that is still moving loses ERLE), and the
  microphone again as soon as its output grows louder than its input while it expects
  echo (over 100 ms: a path it no longer models). Switching costs AEC3 a reconvergence
  (the path it models changes), so neither happens on a whim.

No latency is added: each frame's output is the frame minus the echo estimated from
reference already heard.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float32]

_PARTITIONS = 16
_TOP_HZ = 8000.0
_P0 = 10.0  # the state's initial uncertainty (the echo path's per-bin gain is ~0.01-1)
_SMOOTH = 0.8  # the error PSD's smoothing (the innovation's noise)
_A = 0.9999  # the state's transition factor: how fast the path may change
_ENGAGE_DB = 12.0
_ACTIVE_POWER = 1e6  # mean square (int16 scale) of a microphone that hears something
_HISTORY_S = 0.8  # reference kept: the window (up to ~500 ms in) and drift slack


def _sinc_table(taps: int = 24, phases: int = 1024) -> tuple[Floats, NDArray[np.int64]]:
    """Kaiser-windowed sinc fractional-delay filters, one row per 1/``phases`` sample."""
    half = taps // 2
    offsets = np.arange(-half + 1, half + 1)
    x = offsets[None, :] - (np.arange(phases + 1) / phases)[:, None]
    window = np.interp(x, np.linspace(-half, half, taps + 1), np.kaiser(taps + 1, 8.0))
    table = np.sinc(x) * window
    table /= table.sum(axis=1, keepdims=True)
    return table.astype(np.float32), offsets.astype(np.int64)


_TABLE, _OFFSETS = _sinc_table()
_HALF = int(_OFFSETS[-1])
_REVERSED = np.ascontiguousarray(_TABLE[:, ::-1])  # for np.convolve


class LinearCanceller:
    """One microphone's linear stage (mono, int16-scale float frames of ``frame``
    samples at ``rate``); see the module docstring. Not thread-safe: one caller."""

    def __init__(self, rate: int, frame: int, delay: int, drift: float = 0.0) -> None:
        self.rate = rate
        self.n = n = frame
        self.m = m = _PARTITIONS
        self.k = k = min(frame + 1, round(_TOP_HZ * 2 * frame / rate) + 1)
        self.cut = min(frame // 2 + 1, round(_TOP_HZ * frame / rate) + 1)  # in a frame's rfft
        self.delay = max(delay, _HALF + 1)  # reference samples before the first tap
        self.drift = drift  # reference samples per microphone sample, minus one
        self.phase = 0.0  # accumulated reference offset from the drift
        self.keep = round(_HISTORY_S * rate)  # reference samples kept behind the frame
        self.history = np.zeros(2 * self.keep + frame, np.float32)  # filled, then folded
        self.end = self.keep  # where the next frame goes
        self.x = np.zeros((m, k), np.complex64)  # reference spectra, newest first
        self.x2 = np.zeros((m, k), np.float32)  # their powers
        self.w2 = np.zeros((2, m, k), np.complex64)  # background (adapting), foreground
        self.p = np.full((m, k), _P0, np.float32)  # the background's state uncertainty
        self.psi = np.zeros(k, np.float32)
        self.power = np.zeros(k, np.float32)  # the reference's long-term PSD
        self.window = np.zeros(2 * n, np.float32)
        self.pad = np.zeros(2 * n, np.float32)
        self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
        self.count = 0
        self.snapshot: NDArray[np.complex64] | None = None
        self.snapshot_at = 0
        self.mic_power = 0.0
        self.out_power = 0.0
        self.mic_now = 0.0  # the same over about 100 ms
        self.out_now = 0.0
        self.echo_now = 0.0  # the foreground's echo estimate, over about 100 ms
        self.engaged = False
        self.lost = False  # the read position left the history: restart it
        bins = np.arange(k)
        self.signs = (np.where(bins % 2 == 0, 1.0, -1.0)[None, :] ** np.arange(m)[:, None]).astype(
            np.float32
        )
        hz = bins * rate / (2 * n)
        self.band = (hz > 150) & (hz < 2500)
        self.omega = (np.pi * bins[self.band] / n).astype(np.float32)

    def restarted(self, delay: int | None = None) -> LinearCanceller:
        """A fresh filter (window from ``delay``, or where this one reads now) keeping
        the reference history and the drift estimate."""
        where = round(self.delay - self.phase) if delay is None else delay
        fresh = LinearCanceller(self.rate, self.n, where, self.drift)
        fresh.history[:] = self.history
        fresh.end = self.end
        return fresh

    @property
    def reads_ms(self) -> float:
        """Where the filter's window starts now, after the reference handed over."""
        return (self.delay - self.phase) * 1000 / self.rate

    @property
    def erle_db(self) -> float | None:
        """Microphone over the filter's output below 8 kHz, over about a second."""
        if self.mic_power <= _ACTIVE_POWER or self.out_power <= 0:
            return None
        return 10 * math.log10(self.mic_power / self.out_power)

    def process(self, near: Floats, far: Floats) -> Floats:
        """One frame: microphone ``near`` and the reference handed over with it (both
        int16 scale); the microphone with the echo estimate taken off once engaged."""
        n = self.n
        if self.end + n > len(self.history):  # fold: keep the last ``keep`` samples
            self.history[: self.keep] = self.history[self.end - self.keep : self.end]
            self.end = self.keep
        self.history[self.end : self.end + n] = far
        self.end += n
        x = self._reference()
        e = self._filter(near, x)
        # The gate and the figures count the band the filter models: above it the
        # output is the microphone (AEC3 suppresses there), which would cap what a
        # wideband far end (music, sibilants) lets it show it removes.
        spectrum = np.fft.rfft(near)[self.cut :]
        above = 2 * float(np.vdot(spectrum, spectrum).real) / n
        mic = max(0.0, float(near @ near) - above)
        out = max(0.0, float(e @ e) - above)
        self.mic_power = 0.99 * self.mic_power + 0.01 * mic
        self.out_power = 0.99 * self.out_power + 0.01 * out
        self.mic_now = 0.9 * self.mic_now + 0.1 * mic
        self.out_now = 0.9 * self.out_now + 0.1 * out
        if not self.engaged:
            self.engaged = (
                self.mic_power > _ACTIVE_POWER
                and self.mic_power > 10 ** (_ENGAGE_DB / 10) * self.out_power
            )
        elif self.out_now > 1.4 * self.mic_now and self.echo_now > 0.25 * self.mic_now:
            # It adds more than it removes while it expects echo (the echo path moved;
            # not a quiet far end, when it removes nothing): AEC3 gets the microphone
            # until it has converged again. The Kalman state is sure of a path that is
            # gone: its uncertainty goes back up, so it re-learns from the weights it
            # has in 2-3 s (left alone it took over 10 s after a 6 ms step or a new
            # room response at the same delay; bench/audio.py).
            self.engaged = False
            self.mic_power = self.out_power = 0.0
            self.p[:] = _P0
        return e if self.engaged else near

    def _reference(self) -> Floats:
        """The frame's reference: the history at ``n - delay + phase(n)``, interpolated.
        One fractional delay for the whole frame (the drift moves the position by
        0.05 sample over a frame at 100 ppm: the phase error is under -30 dB at 8 kHz)."""
        start = self.end - self.n - self.delay + self.phase + self.drift * self.n / 2
        self.phase += self.drift * self.n
        whole = math.floor(start)
        row = _REVERSED[round((start - whole) * (len(_TABLE) - 1))]
        first = whole + int(_OFFSETS[0])
        last = whole + self.n - 1 + _HALF
        if first < self.end - self.n - self.keep or last >= self.end:
            self.lost = True  # drifted out of what is kept: zeros until restarted
            return np.zeros(self.n, np.float32)
        out: Floats = np.convolve(self.history[first : last + 1], row, mode="valid")
        return out

    def _filter(self, d: Floats, x: Floats) -> Floats:
        n = self.n
        self.window[:n] = self.window[n:]
        self.window[n:] = x
        spectrum = np.fft.rfft(self.window)[: self.k].astype(np.complex64, copy=False)
        self.x[1:] = self.x[:-1]
        self.x[0] = spectrum
        self.x2[1:] = self.x2[:-1]
        self.x2[0] = spectrum.real**2 + spectrum.imag**2
        y2 = np.fft.irfft(np.einsum("mk,pmk->pk", self.x, self.w2), 2 * n)[:, n:]
        e2 = (d - y2).astype(np.float32)
        y, yf = y2
        e, ef = e2
        self.echo_now = 0.9 * self.echo_now + 0.1 * float(yf @ yf)
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
            self.w2[0] = self.w2[1]  # the background diverged (double talk): back to it
            self.davg1 = self.davg2 = self.dvar1 = self.dvar2 = 0.0
            e = ef
        self._adapt(e)
        self.count += 1
        self._track_drift()
        out: Floats = ef
        return out

    def _adapt(self, e: Floats) -> None:
        """The Kalman update, diagonal per partition and bin."""
        n = self.n
        if self.count:
            self.power *= 0.99
            self.power += 0.01 * self.x2[0]
        else:
            self.power[:] = self.x2[0]
        self.pad[n:] = e
        err = np.fft.rfft(self.pad)[: self.k].astype(np.complex64, copy=False)
        self.psi *= _SMOOTH
        self.psi += (1 - _SMOOTH) * (err.real**2 + err.imag**2)
        px = self.p * self.x2
        mu = self.p / (px.sum(axis=0) + 2 * self.psi + 1e-3)
        w = self.w2[0]
        w += (mu * err) * np.conj(self.x)
        rows = [0, 1 + self.count % (self.m - 1)]  # two partitions constrained a frame
        taps = np.fft.irfft(w[rows], 2 * n)
        taps[:, n:] = 0
        w[rows] = np.fft.rfft(taps)[:, : self.k]
        a2 = _A * _A
        self.p -= 0.5 * mu * px
        self.p *= a2
        self.p += (1 - a2) * (w.real**2 + w.imag**2)
        w *= _A

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
            drift = self.drift - 0.5 * moved / ((self.count - self.snapshot_at) * self.n)
            self.drift = min(1e-3, max(-1e-3, drift))  # sound cards: well within 1000 ppm
        self.snapshot = response
        self.snapshot_at = self.count

"""System metrics for the ``system`` and ``agent`` sections of the health message.

`SystemMetrics.read()` returns the ``system`` section of docs/contracts.md. Every read
that touches the file system (``/proc``, ``/sys/class/hwmon``, ``statvfs`` of the state
directory: a stuck NFS mount or a slow SD card can block it) runs in a worker thread via
``asyncio.to_thread``; `SystemMetrics.sample()` is the blocking body, for tests and
benchmarks.

CPU use is the busy share of all cores since the previous reading, computed from our own
copy of the previous ``cpu_times()`` rather than ``psutil.cpu_percent(None)``, whose
"previous reading" is one global per process that any other caller would reset.

Clock synchronisation is the kernel's own verdict: ``adjtimex(2)`` with ``modes = 0``
only reads (no privilege needed) and returns ``TIME_ERROR`` (5) while the clock is
unsynchronised (``STA_UNSYNC``, set until an NTP daemon disciplines it). It is one cheap
system call, so it needs no thread of its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import psutil

log = logging.getLogger(__name__)

TIME_ERROR = 5  # adjtimex(2): clock not synchronised
_TIMEX_SIZE = 512  # struct timex is 208 bytes on 64-bit Linux; zeroed, so modes = 0 (read only)

# Chips (psutil.sensors_temperatures() keys) that measure the CPU / SoC, best first.
CPU_SENSOR_CHIPS = (
    "coretemp",  # Intel cores and package
    "k10temp",  # AMD
    "zenpower",
    "cpu_thermal",  # Raspberry Pi and other ARM SoCs
    "cpu-thermal",
    "soc_thermal",
    "x86_pkg_temp",
    "acpitz",  # ACPI thermal zone: often the CPU on mini-PCs without coretemp
)


class _TempReading(Protocol):
    @property
    def current(self) -> float: ...


class CpuTimes(NamedTuple):
    busy: float
    total: float


def _cpu_times() -> CpuTimes:
    times = psutil.cpu_times()
    total = sum(times)
    # psutil counts guest time inside user time on Linux; do not count it twice.
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return CpuTimes(total - idle, total)


def cpu_percent_between(before: CpuTimes, after: CpuTimes) -> float:
    """Busy share of all cores between two readings, 0-100."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (after.busy - before.busy) / total))


def pick_cpu_temperature(readings: Mapping[str, Sequence[_TempReading]]) -> float | None:
    """The hottest reading of the first CPU-like chip present, else the hottest of all."""
    for chip in CPU_SENSOR_CHIPS:
        values = [r.current for r in readings.get(chip, ()) if r.current is not None]
        if values:
            return float(max(values))
    values = [r.current for entries in readings.values() for r in entries if r.current is not None]
    return float(max(values)) if values else None


def read_temperature() -> float | None:
    """Highest CPU temperature in degrees C, None without sensors (VMs, containers)."""
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = sensors()
    except (OSError, RuntimeError) as exc:
        log.debug("temperature sensors unreadable: %s", exc)
        return None
    return pick_cpu_temperature(readings)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def read_clock_synced() -> bool | None:
    """The kernel's NTP sync status via ``adjtimex``; None where it cannot be read."""
    libc = _libc()
    if libc is None or not hasattr(libc, "adjtimex"):
        return None
    timex = ctypes.create_string_buffer(_TIMEX_SIZE)
    state = int(libc.adjtimex(timex))
    if state < 0:  # seccomp or an exotic kernel: we do not know
        return None
    return state != TIME_ERROR


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the state directory may not exist yet)."""
    candidate = path.absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


class SystemMetrics:
    """Reads the ``system`` section; construct once and keep (CPU use is a difference)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        temperature: Callable[[], float | None] = read_temperature,
        clock_synced: Callable[[], bool | None] = read_clock_synced,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._temperature = temperature
        self._clock_synced = clock_synced
        self._cpu_before = _cpu_times()  # primes cpu_percent: the first read is meaningful

    def sample(self) -> dict[str, Any]:
        """The ``system`` section (blocking: file system and /proc reads)."""
        now = _cpu_times()
        cpu = cpu_percent_between(self._cpu_before, now)
        self._cpu_before = now
        disk = psutil.disk_usage(str(existing_parent(self.state_dir)))
        temperature = self._temperature()
        return {
            "cpu_percent": round(cpu, 1),
            "load1": round(os.getloadavg()[0], 2),
            "memory_percent": round(psutil.virtual_memory().percent, 1),
            "disk_percent": round(disk.percent, 1),
            "disk_free_mb": round(disk.free / 2**20, 1),
            "temperature_c": None if temperature is None else round(temperature, 1),
            "uptime_s": round(max(0.0, time.time() - psutil.boot_time()), 1),
            "clock_synced": self._clock_synced(),
        }

    async def read(self) -> dict[str, Any]:
        """The ``system`` section, read in a worker thread."""
        return await asyncio.to_thread(self.sample)


class ProcessMetrics:
    """The agent process's own figures for the ``agent`` section (cheap: /proc/self)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the first reading is always 0
        self._started = self._process.create_time()

    def section(self, *, version: str, profile: str, services: Mapping[str, str]) -> dict[str, Any]:
        """``{"version", "profile", "cpu_percent", "rss_mb", "uptime_s", "services"}``."""
        return {
            "version": version,
            "profile": profile,
            "cpu_percent": round(self._process.cpu_percent(None), 1),
            "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
            "uptime_s": round(max(0.0, time.time() - self._started), 1),
            "services": dict(services),
        }

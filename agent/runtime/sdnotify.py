"""A small sd_notify client, and the watchdog as a supervisor service.

Why our own: the protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX
socket named by ``$NOTIFY_SOCKET``, which is less code than a dependency to vet and
package for every kit. Outside systemd (tests, a developer's shell) ``NOTIFY_SOCKET``
is unset and every call is a no-op, so the daemon never needs to know where it runs.

Why the watchdog lives on the event loop: systemd restarts the unit when pings stop
for ``WatchdogSec``. Pings sent from a thread would keep coming while the asyncio loop
is wedged (a blocking call, a busy loop in a callback), which is exactly the failure
worth a restart. So the ping is sent by a coroutine: a blocked loop stops the pings,
and the supervisor's ``is_healthy()`` can withhold them when a service is beyond repair.

Notification must never take the daemon down: sends are non-blocking, and a failure
is logged once (until a send succeeds again) and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

# Variables systemd hands the main process. They are removed from our own environment
# once read so that children (the embedded Mosquitto is built with libsystemd) do not
# try to notify on our behalf; with NotifyAccess=main systemd would only log a warning
# about each of their messages, with NotifyAccess=all they could mark us ready.
_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages; does nothing when there is no ``NOTIFY_SOCKET``.

    Every method returns True when the datagram was handed to the kernel and False
    otherwise (disabled, or the send failed). Callers normally ignore the result:
    systemd's verdict (a missed READY or watchdog) is the consequence that matters.
    Meant to be used from the event loop's thread, like the rest of the daemon.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        """``address`` is a filesystem path or an abstract name starting with ``@``.

        ``watchdog_usec`` is the already validated ``WATCHDOG_USEC`` for this process,
        or None when systemd runs no watchdog for it.
        """
        self._address = _socket_address(address) if address else None
        # Pings that cannot be sent are no watchdog at all.
        self._watchdog_usec: int | None = None
        if self._address is not None and watchdog_usec is not None and watchdog_usec > 0:
            self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = True,
    ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        By default the three variables are then removed from ``environ`` (``os.environ``
        unless given), so subprocesses do not inherit them.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _watchdog_usec(env)
        if unset_environment:
            for name in _ENV_VARS:
                env.pop(name, None)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WatchdogSec=``), or None when there is none.

        Pings are due well within it; ``watchdog_loop`` pings at half this interval.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished: systemd marks the unit active, arms the watchdog."""
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(fields)

    def reloading(self) -> bool:
        """A reload began; ``ready()`` ends it.

        MONOTONIC_USEC is sent along because newer systemd (Type=notify-reload) requires it
        to match the reload to the request; older versions ignore it.
        """
        return self.notify(
            {
                "RELOADING": "1",
                "MONOTONIC_USEC": str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000),
            }
        )

    def stopping(self) -> bool:
        """The final shutdown began, so systemd does not take the wait for a hang.

        Only for the process's own exit, never around a reload: systemd treats STOPPING=1
        as if it had sent SIGTERM itself. The unit turns "deactivating" for good (a later
        READY=1 does not bring it back) and is SIGKILLed when TimeoutStopSec runs out.
        """
        return self.notify({"STOPPING": "1"})

    def status(self, text: str) -> bool:
        """Free-form one-line status, shown by ``systemctl status``."""
        return self.notify({"STATUS": text})

    def watchdog(self) -> bool:
        """Keep-alive ping; due more often than ``watchdog_interval()``."""
        return self.notify({"WATCHDOG": "1"})

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start, reload or stop times out.

        For slow, legitimate work before READY (loading models on a slow kit).
        """
        return self.notify({"EXTEND_TIMEOUT_USEC": str(max(0, round(seconds * 1_000_000)))})

    def notify(self, fields: Mapping[str, str]) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False (and logged once) on failure.

        A value cannot contain a newline: it would start a new assignment, so a status
        text carrying "\\nREADY=1" could otherwise forge a readiness notification.
        Newlines are replaced with spaces.
        """
        if self._address is None:
            return False
        payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode(
            "utf-8", "replace"
        )
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # A full receive queue (EAGAIN), a vanished socket, a seccomp refusal: all
            # are systemd's problem or transient, never a reason to disturb a lesson.
            if not self._failing:
                self._failing = True
                log.warning(
                    "sd_notify to %s failed (%s); further failures are not logged "
                    "until a message gets through",
                    self._describe(),
                    exc,
                )
            return False
        if self._failing:
            self._failing = False
            log.info("sd_notify to %s works again", self._describe())
        return True

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _describe(self) -> str:
        address = self._address
        if isinstance(address, bytes):  # abstract: leading NUL
            return "@" + address[1:].decode("utf-8", "replace")
        return str(address)


def _socket_address(address: str) -> str | bytes:
    # An abstract socket name starts with '@' in the variable and NUL on the wire.
    if address.startswith("@"):
        return b"\0" + address[1:].encode("utf-8")
    return address


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (sd_watchdog_enabled()'s rules)."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            owner = int(pid)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", pid)
            return None
        if owner != os.getpid():
            # Inherited from a parent that systemd watches: the pings are not ours.
            return None
    return usec


async def watchdog_loop(notifier: Notifier, is_healthy: Callable[[], bool]) -> None:
    """Ping the watchdog at half its interval while the loop runs and ``is_healthy()``.

    Runs until cancelled. Without a watchdog it just waits, so it can always be part of
    the supervisor's services. When ``is_healthy()`` returns False (or raises), pings
    are withheld and systemd restarts the unit once ``WatchdogSec`` passes; pings resume
    if health returns first.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        log.debug("no systemd watchdog for this process")
        await asyncio.Event().wait()  # nothing to do until cancelled
        return
    period = interval / 2
    log.info("pinging the systemd watchdog every %.1f s (timeout %.1f s)", period, interval)
    withholding = False
    due = time.monotonic()
    while True:
        late = time.monotonic() - due
        if late > period:
            # The loop itself was blocked; the pings stopped with it.
            log.warning(
                "event loop stalled: watchdog ping %.2f s late (timeout %.1f s)", late, interval
            )
        try:
            healthy = bool(is_healthy())
        except Exception:
            # A broken health check must not look healthy, nor end the watchdog service.
            if not withholding:
                log.exception("health check raised; treating the agent as unhealthy")
            healthy = False
        if healthy:
            if withholding:
                withholding = False
                log.warning("supervisor healthy again: resuming watchdog pings")
            notifier.watchdog()
        elif not withholding:
            withholding = True
            log.error(
                "supervisor unhealthy: withholding watchdog pings; systemd restarts the "
                "agent within %.1f s unless it recovers",
                interval,
            )
        due = time.monotonic() + period
        await asyncio.sleep(period)


class WatchdogService:
    """``watchdog_loop`` as a supervisor service (``name`` and ``async run()``)."""

    def __init__(self, notifier: Notifier, is_healthy: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._is_healthy = is_healthy

    @property
    def name(self) -> str:
        return "watchdog"

    async def run(self) -> None:
        await watchdog_loop(self._notifier, self._is_healthy)

"""The Mosquitto binary as a child process: the embedded demo broker and the test broker.

Why the real Mosquitto rather than an in-process Python broker: the link speaks
MQTT 5 (reason codes in PUBACK, subscription identifiers, clean Last Will handling),
and the only pure-Python broker at hand, amqtt 0.12, speaks MQTT 3.1.1 only: it
refuses an MQTT 5 client ("Invalid protocol ... 5") and was seen delivering retained
messages twice. Running the same broker in the demo, in the tests and in the fleet
also means the ACL and TLS settings tested here are the ones deployed.

`MosquittoBroker` writes a self-contained configuration (listener, password file, ACL,
TLS material, persistence off) into its own work directory, starts
``mosquitto -c <config>`` on a loopback port and waits until the port accepts
connections. The work directory is created with the system temp directory as parent
because Mosquitto started as root drops to the ``mosquitto`` user before it reads the
password and ACL files: a directory under pytest's ``tmp_path`` (mode 0700, owned by
root) would be unreadable to it. As root we hand the directory to the ``mosquitto``
user (mode 0700, files 0600) instead of making anything world-readable; TLS files given
by path are copied in for the same reason.

Everything that waits (process start, the port probe, process exit) is awaited with
asyncio's subprocess and stream APIs; file preparation runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from agent.broker.acl import render_password_file

logger = logging.getLogger(__name__)

_INSTALL_HINT = "mosquitto not found: apt-get install mosquitto"
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_READY_MARKER = " running"  # "mosquitto version 2.0.11 running": listeners are open
_ADDR_IN_USE = "Address already in use"


class BrokerError(RuntimeError):
    """Mosquitto could not be started, or exited when it should not have."""


@dataclass(frozen=True)
class BrokerTls:
    """TLS listener material (PEM files; copied into the broker's work directory)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (PATH first, then the sbin directories)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return shutil.which("mosquitto", path=os.pathsep.join(_EXTRA_BIN_DIRS))


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _drop_user() -> pwd.struct_passwd | None:
    """The account Mosquitto switches to when started as root, if we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


def _read_tail_and_remove(work_dir: Path, max_chars: int = 20_000) -> str:
    log_path = work_dir / "mosquitto.log"
    text = ""
    with contextlib.suppress(OSError):
        text = log_path.read_bytes()[-max_chars:].decode("utf-8", "replace")
    shutil.rmtree(work_dir, ignore_errors=True)
    return text


class MosquittoBroker:
    """A Mosquitto child process on a loopback port.

    ``users`` maps user names to clear-text passwords (hashed into a password file);
    ``acl`` is the text of an ACL file (see `agent.broker.acl.render_acl`);
    ``allow_anonymous`` lets clients without a user name in; ``tls`` turns the one
    listener into a TLS listener (``require_certificate`` for mutual TLS).

    ``await start()`` → running, ``await stop()`` (SIGTERM, then SIGKILL) → stopped,
    ``await start()`` again → running on the same port. ``await kill()`` is the crash
    (SIGKILL, no goodbye to the clients). Each run has its own work directory, deleted
    when the process has exited (``log_tail()`` still shows the last run's log);
    ``async with MosquittoBroker(...) as broker:`` starts and stops.

    As a supervisor service (``name``, ``run()``): starts the broker, raises
    `BrokerError` if it dies, stops it when cancelled.
    """

    name = "mosquitto"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        allow_anonymous: bool = True,
        tls: BrokerTls | None = None,
        extra_config: Sequence[str] = (),
        binary: str | None = None,
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self._port_given = port is not None
        self._port = port if port is not None else free_loopback_port(host)
        self.users: dict[str, str] = dict(users or {})
        self.acl = acl
        self.allow_anonymous = allow_anonymous
        self.tls = tls
        self.extra_config = list(extra_config)
        self._binary = binary
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._work_dir: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._log_handle: IO[bytes] | None = None
        self._last_log = ""  # log of the last finished run, kept after its directory is gone
        self._started_once = False
        self._stopping = False
        self.starts = 0

    # -- properties -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` or ``mqtts://host:port``; final after the first start()."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self._port}"

    @property
    def work_dir(self) -> Path | None:
        return self._work_dir

    @property
    def log_path(self) -> Path | None:
        return self._work_dir / "mosquitto.log" if self._work_dir else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_running and self._process else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines Mosquitto wrote in the current (or last) run."""
        path = self.log_path
        if path is not None and path.exists():
            text = path.read_bytes().decode("utf-8", "replace")
        else:
            text = self._last_log
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start Mosquitto and wait until its port accepts connections.

        Raises `BrokerError` (with the tail of Mosquitto's log) when the binary is
        missing, the process exits, or the port does not open within
        ``start_timeout_s``. A no-op when already running.
        """
        if self.is_running:
            return
        binary = await asyncio.to_thread(self._find_binary)
        if binary is None:
            raise BrokerError(_INSTALL_HINT)
        for _ in range(3):
            await asyncio.to_thread(self._prepare_files)
            try:
                await self._spawn_and_wait(binary)
            except BrokerError as exc:
                # A port picked by us can be taken in the gap between probing and
                # binding; pick another unless the caller fixed it or clients know it.
                if _ADDR_IN_USE in str(exc) and not self._port_given and not self._started_once:
                    logger.info("port %d was taken meanwhile; picking another", self._port)
                    self._port = free_loopback_port(self.host)
                    continue
                raise
            self._started_once = True
            self.starts += 1
            logger.info("mosquitto started: %s (pid %s)", self.url, self.pid)
            return
        raise BrokerError(f"could not find a free port for mosquitto on {self.host}")

    async def stop(self) -> None:
        """Stop Mosquitto: SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        try:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), self.stop_timeout_s)
                except TimeoutError:
                    logger.warning(
                        "mosquitto ignored SIGTERM for %.1f s; killing it", self.stop_timeout_s
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            logger.info("mosquitto stopped (%s, exit code %s)", self.url, process.returncode)
        finally:
            self._process = None
            self._stopping = False
            await self._cleanup()

    async def kill(self) -> None:
        """Kill Mosquitto with SIGKILL (a crash: clients get no DISCONNECT)."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        try:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.wait()
            logger.info("mosquitto killed (%s)", self.url)
        finally:
            self._process = None
            self._stopping = False
            await self._cleanup()

    async def restart(self) -> None:
        """Stop, then start again on the same port."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        """Stop Mosquitto (an alias of `stop`, for ``contextlib.aclosing`` and friends)."""
        await self.stop()

    async def _cleanup(self) -> None:
        """Close the log, keep its tail in memory and delete the run's work directory."""
        self._close_log()
        work_dir, self._work_dir = self._work_dir, None
        if work_dir is not None:
            self._last_log = await asyncio.to_thread(_read_tail_and_remove, work_dir)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(self) -> None:
        """Supervisor service: keep Mosquitto running; stop it on cancellation."""
        await self.start()
        process = self._process
        assert process is not None
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise
        if self._stopping or self._process is not process:
            return  # stopped on purpose by stop()/kill()
        tail = self.log_tail()
        self._process = None
        await self._cleanup()
        raise BrokerError(f"mosquitto exited unexpectedly (code {code}); last log lines:\n{tail}")

    # -- internals --------------------------------------------------------------------

    def _find_binary(self) -> str | None:
        if self._binary is not None:
            return self._binary if Path(self._binary).is_file() else None
        return find_mosquitto()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def _prepare_files(self) -> None:
        """Write the config and its files into the work directory (worker thread)."""
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="agent-mosquitto-"))
        work = self._work_dir
        owner = _drop_user()
        files: dict[str, bytes] = {}
        lines = [
            "# Generated by agent.broker.embedded; rewritten at every start.",
            "per_listener_settings false",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
        ]
        if owner is not None:
            lines.append(f"user {owner.pw_name}")
        if self.users:
            files["passwd"] = render_password_file(self.users).encode()
            lines.append(f"password_file {work / 'passwd'}")
        if self.acl is not None:
            files["acl"] = self.acl.encode()
            lines.append(f"acl_file {work / 'acl'}")
        lines.append(f"listener {self._port} {self.host}")
        if self.tls is not None:
            files["ca.pem"] = Path(self.tls.ca_file).read_bytes()
            files["server.pem"] = Path(self.tls.cert_file).read_bytes()
            files["server.key"] = Path(self.tls.key_file).read_bytes()
            lines += [
                f"cafile {work / 'ca.pem'}",
                f"certfile {work / 'server.pem'}",
                f"keyfile {work / 'server.key'}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        lines += self.extra_config
        files["mosquitto.conf"] = ("\n".join(lines) + "\n").encode()

        if owner is not None:
            os.chown(work, owner.pw_uid, owner.pw_gid)
            os.chmod(work, 0o700)
        else:
            # Not root: Mosquitto keeps our uid. Root without a 'mosquitto' account:
            # it falls back to 'nobody', which needs read access.
            os.chmod(work, 0o700 if os.geteuid() != 0 else 0o755)
        for name, data in files.items():
            path = work / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)
            elif os.geteuid() == 0:
                os.chmod(path, 0o644)

    async def _spawn_and_wait(self, binary: str) -> None:
        assert self._work_dir is not None
        log_path = self._work_dir / "mosquitto.log"
        self._close_log()
        self._log_handle = log_path.open("ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(self._work_dir / "mosquitto.conf"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log_handle,
                stderr=asyncio.subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches the agent, which then
                # says goodbye over MQTT before it stops the broker.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"cannot start {binary}: {exc}") from exc
        try:
            await self._wait_ready()
        except BaseException:
            await self._discard_process()
            raise

    async def _discard_process(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await self._cleanup()

    async def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.01
        while True:
            if process.returncode is not None:
                raise BrokerError(
                    f"mosquitto exited during start (code {process.returncode}) for "
                    f"{self.url}; last log lines:\n{self.log_tail()}"
                )
            if self._log_says_running() and await self._port_accepts():
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.url} within "
                    f"{self.start_timeout_s:.0f} s; last log lines:\n{self.log_tail()}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _log_says_running(self) -> bool:
        # A TCP connect alone could reach another process that holds the port while
        # ours is about to fail with "Address already in use".
        return _READY_MARKER in self.log_tail(50)

    async def _port_accepts(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self._port), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

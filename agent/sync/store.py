"""Store-and-forward: an on-disk outbox (SQLite) and the publisher that drains it.

`ReliablePublisher.send(topic, payload, kind)` is how the agent sends a QoS 1 message
that must survive an outage (alerts, sensing aggregates, other events). When the link is
up and nothing is waiting, the message goes straight out and ``send`` returns once the
broker acknowledged it. Otherwise it is appended to the `Outbox` and ``send`` returns
once it is on disk. The publisher's ``run()`` (a supervisor service) drains the outbox in
order whenever the link is up, one message in flight at a time, adding
``"delayed": true`` to JSON objects, and deletes a row only after its PUBACK. Delivery is
therefore *at least once*: a PUBACK lost with the connection, or a kill between PUBACK
and the delete, sends that message again (the receiver sees the same alert ``id`` and
``state`` twice; it never sees a new incident id).

Order: new messages go to the store whenever anything is queued, and the drain sends
rows by ascending id (AUTOINCREMENT: ids are never reused), so a subscriber sees them
in ``send`` order. A message the broker refuses (`PublishRejected`, e.g. the ACL) is
logged and deleted: it will never succeed and must not block the queue.

The bound (``health.store_max_rows``) applies to what may be dropped: past it, the oldest
``telemetry`` rows go first, then the oldest ``event`` rows; ``alert`` rows are never
dropped. A store that is all alerts grows past the bound (with a warning each time it
doubles): alerts are rare (one raise and one clear per incident, with hysteresis), and
an operator would rather lose disk than the record of a failure.

Durability: WAL journal with ``synchronous=FULL``. ``kill -9`` of the agent alone loses
nothing committed even with ``NORMAL`` (the WAL is in the kernel's page cache), but a
classroom PC's most common crash is the power switch at the wall, and then ``NORMAL``
can lose the last transactions. ``FULL`` syncs the WAL at every commit: one fsync per
stored message, which is cheap because messages are only stored during outages or
backlogs and alerts are rare. The file is checked (``quick_check``) when opened; a
corrupt file is moved aside and a fresh one started, so a damaged SD card cannot stop
the agent.

Every SQLite call runs on the outbox's single worker thread (a one-thread executor that
also owns the connection), never on the event loop; calls are queued, so they run in
the order they were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal, TypeVar

from agent.sync.link import MqttLink
from agent.sync.messages import LinkDown, LinkError, Payload, PublishRejected, encode_payload

log = logging.getLogger(__name__)

Kind = Literal["alert", "event", "telemetry"]
KINDS: tuple[Kind, ...] = ("alert", "event", "telemetry")
DEFAULT_MAX_ROWS = 10_000
STORE_RETRY_S = 30.0  # an outbox that cannot be opened is tried again this often
_DELETE_CHUNK = 500  # SQLite's default host-parameter limit is higher; keep statements small
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('alert', 'event', 'telemetry')),
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class OutboxError(Exception):
    """The outbox file cannot be used (unwritable directory, disk full)."""


@dataclass(frozen=True)
class StoredMessage:
    id: int
    topic: str
    payload: bytes
    kind: str
    created: float  # epoch seconds when it was stored


class Outbox:
    """A bounded FIFO of MQTT messages in one SQLite file (see the module docstring).

    Opens lazily on the first call (or ``await open()``); ``await close()`` closes the
    connection and stops the worker thread, and a later call opens it again.
    """

    def __init__(self, path: Path, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = Path(path)
        self.max_rows = max_rows
        self.dropped = 0  # telemetry/event rows dropped by the bound
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the worker thread (the loop reads the ints, which is safe).
        self._conn: sqlite3.Connection | None = None
        self._count = 0
        self._warn_at = max_rows

    # -- loop side ------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Rows waiting (as of the last call; 0 before the first)."""
        return self._count

    async def open(self) -> int:
        """Open (or create) the file; returns the number of queued rows. Idempotent."""
        return await self._call(lambda: self._count)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        future = asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
        executor.shutdown(wait=False)  # the worker finishes the close, then exits
        await asyncio.shield(future)

    async def append(self, topic: str, payload: bytes, kind: Kind) -> int:
        """Store one message (committed and synced when this returns); its row id."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return await self._call(functools.partial(self._append, topic, bytes(payload), kind))

    async def peek(self, limit: int = 64) -> list[StoredMessage]:
        """The oldest ``limit`` rows, in order (not removed)."""
        return await self._call(functools.partial(self._peek, limit))

    async def delete(self, ids: Sequence[int]) -> int:
        """Remove delivered rows; returns how many existed."""
        return await self._call(functools.partial(self._delete, list(ids)))

    async def count(self) -> int:
        return await self._call(self._count_rows)

    async def get_state(self, key: str) -> str | None:
        """A small persistent value (e.g. the active alerts), None if never set."""
        return await self._call(functools.partial(self._get_state, key))

    async def set_state(self, key: str, value: str) -> None:
        await self._call(functools.partial(self._set_state, key, value))

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        return await self._call(self._integrity_check)

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, functools.partial(self._in_worker, fn))
        # Shielded: a caller cancelled mid-call (shutdown) does not cancel a queued job,
        # so what was asked (a delete after PUBACK, an append) still happens, in order,
        # before a later close().
        return await asyncio.shield(job)

    # -- worker thread --------------------------------------------------------------

    def _in_worker(self, fn: Callable[[], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        try:
            return fn()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._open_checked()
        except sqlite3.OperationalError as exc:  # cannot open or write: not the file's fault
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database, malformed, failed quick_check
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error(
                "outbox %s is damaged (%s); moved to %s, starting afresh", self.path, exc, aside
            )
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
            try:
                conn = self._open_checked()
            except sqlite3.Error as again:
                raise OutboxError(f"cannot create outbox {self.path}: {again}") from again
        except OSError as exc:
            raise OutboxError(f"cannot create outbox {self.path}: {exc}") from exc
        self._count = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._warn_at = max(self.max_rows, self._count)
        if self._count:
            log.info("outbox %s: %d messages waiting from before", self.path, self._count)
        return conn

    def _open_checked(self) -> sqlite3.Connection:
        # isolation_level=None: we write BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {verdict}")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    def _append(self, topic: str, payload: bytes, kind: str) -> int:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            cursor = db.execute(
                "INSERT INTO outbox (topic, payload, kind, created) VALUES (?, ?, ?, ?)",
                (topic, payload, kind, time.time()),
            )
            row_id = int(cursor.lastrowid or 0)
            count = self._count + 1
            dropped = 0
            if count > self.max_rows:
                # Telemetry first (kind = 'event' sorts after it), oldest first; never alerts.
                dropped = db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE kind != 'alert' "
                    "ORDER BY kind = 'event', id LIMIT ?)",
                    (count - self.max_rows,),
                ).rowcount
                count -= dropped
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._count = count
        if dropped:
            self.dropped += dropped
            log.warning(
                "outbox full (%d rows): dropped the %d oldest telemetry/event message(s)",
                self.max_rows,
                dropped,
            )
        if count > self._warn_at:
            self._warn_at = count * 2
            log.warning(
                "outbox holds %d messages, more than its bound of %d: only alerts are left, "
                "and alerts are never dropped",
                count,
                self.max_rows,
            )
        return row_id

    def _peek(self, limit: int) -> list[StoredMessage]:
        rows = self._db().execute(
            "SELECT id, topic, payload, kind, created FROM outbox ORDER BY id LIMIT ?", (limit,)
        )
        return [
            StoredMessage(int(r[0]), str(r[1]), bytes(r[2]), str(r[3]), float(r[4])) for r in rows
        ]

    def _delete(self, ids: list[int]) -> int:
        if not ids:
            return 0
        db = self._db()
        removed = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(ids), _DELETE_CHUNK):
                chunk = ids[start : start + _DELETE_CHUNK]
                marks = ",".join("?" * len(chunk))
                removed += db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._count = max(0, self._count - removed)
        if self._count <= self.max_rows:
            self._warn_at = self.max_rows
        return removed

    def _count_rows(self) -> int:
        self._count = int(self._db().execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        return self._count

    def _get_state(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_state(self, key: str, value: str) -> None:
        self._db().execute(
            "INSERT INTO state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _integrity_check(self) -> str:
        return str(self._db().execute("PRAGMA integrity_check").fetchone()[0])


class Delivery(StrEnum):
    SENT = "sent"  # acknowledged by the broker
    QUEUED = "queued"  # on disk; the drain loop will deliver it
    REJECTED = "rejected"  # the broker refused it (ACL): dropped, logged
    LOST = "lost"  # neither sent nor stored (the store failed): logged


def mark_delayed(payload: bytes) -> Payload:
    """A stored JSON object with ``"delayed": true``; anything else unchanged."""
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload
    if not isinstance(value, dict):
        return payload
    value["delayed"] = True
    return value


class ReliablePublisher:
    """QoS 1 publishing that survives outages (see the module docstring).

    A supervisor service: ``run()`` opens the outbox, drains it whenever the link is up,
    and closes it when cancelled.
    """

    name = "outbox"

    def __init__(
        self,
        link: MqttLink,
        outbox: Outbox,
        *,
        ack_timeout_s: float = 10.0,
        batch: int = 64,
        retry_s: float = 0.5,
    ) -> None:
        self.link = link
        self.outbox = outbox
        self.ack_timeout_s = ack_timeout_s
        self.batch = batch
        self.retry_s = retry_s
        self.sent_direct = 0
        self.delivered = 0  # from the outbox
        self.rejected = 0
        self.lost = 0
        self._lock = asyncio.Lock()  # one send() decides and acts at a time: keeps order
        self._wake = asyncio.Event()

    @property
    def queued(self) -> int:
        """Messages waiting in the outbox (the health message's ``mqtt.queued``)."""
        return self.outbox.queued

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "sent_direct": self.sent_direct,
            "delivered_later": self.delivered,
            "rejected": self.rejected,
            "dropped": self.outbox.dropped,
            "lost": self.lost,
        }

    async def send(self, topic: str, payload: Payload, kind: Kind = "event") -> Delivery:
        """Publish at QoS 1 now, or store for later; returns what happened.

        Returns once the broker acknowledged the message or it is on disk. A direct
        publish that fails (link down, no PUBACK within ``ack_timeout_s``) is stored and
        sent again: at least once. Without a usable outbox (unwritable state directory)
        messages are still sent directly while the link is up, and lost while it is down.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        data, _ = encode_payload(payload)
        async with self._lock:
            store_error: OutboxError | None = None
            try:
                queued = await self.outbox.open()
            except OutboxError as exc:
                store_error, queued = exc, 0
            if self.link.is_connected and queued == 0:
                try:
                    async with asyncio.timeout(self.ack_timeout_s):
                        await self.link.publish(topic, payload, qos=1)
                except PublishRejected as exc:
                    self.rejected += 1
                    log.error("dropped a %s message the broker will never accept: %s", kind, exc)
                    return Delivery.REJECTED
                except (LinkError, TimeoutError) as exc:
                    log.debug(
                        "direct publish to %s failed (%s); storing it",
                        topic,
                        str(exc) or "no PUBACK in time",
                    )
                else:
                    self.sent_direct += 1
                    return Delivery.SENT
            try:
                if store_error is not None:
                    raise store_error
                await self.outbox.append(topic, data, kind)
            except OutboxError as exc:
                self.lost += 1
                log.error("lost a %s message to %s: %s", kind, topic, exc)
                return Delivery.LOST
        self._wake.set()
        return Delivery.QUEUED

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._drain_forever()
                except OutboxError as exc:
                    # The agent's other work matters more than its backlog: keep running
                    # (send() falls back to direct publishing) and try the file again.
                    log.error("%s; retrying in %.0f s", exc, STORE_RETRY_S)
                    await asyncio.sleep(STORE_RETRY_S)
        finally:
            await self.outbox.close()

    async def _drain_forever(self) -> None:
        await self.outbox.open()
        while True:
            self._wake.clear()
            if self.outbox.queued == 0:
                await self._wake.wait()
                continue
            await self.link.wait_connected()
            if not await self._drain_batch():
                await asyncio.sleep(self.retry_s)  # the link is going down; let it

    async def _drain_batch(self) -> bool:
        """Deliver the oldest rows in order; False when the link failed under us."""
        rows = await self.outbox.peek(self.batch)
        done: list[int] = []
        try:
            for row in rows:
                try:
                    async with asyncio.timeout(self.ack_timeout_s):
                        await self.link.publish(row.topic, mark_delayed(row.payload), qos=1)
                except PublishRejected as exc:
                    self.rejected += 1
                    log.error("dropped a stored %s message the broker refuses: %s", row.kind, exc)
                except LinkDown as exc:
                    log.debug("outbox drain paused: %s", exc)
                    return False
                except (LinkError, TimeoutError) as exc:
                    log.warning("outbox drain paused: %s", str(exc) or "no PUBACK in time")
                    return False
                else:
                    self.delivered += 1
                done.append(row.id)
            return True
        finally:
            if done:
                # Also on cancellation (the call is shielded): what the broker has must
                # not be sent again.
                await self.outbox.delete(done)
                log.debug("outbox: delivered %d, %d left", len(done), self.outbox.queued)

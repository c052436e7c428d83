"""The sensing service: samples the camera, runs the pipeline in a worker thread, keeps
attendance per lesson and publishes per-minute aggregates (counts only).

Frames come from ``FrameHub.subscribe()``: the service sleeps until the next sample is
due, then takes the newest frame (the hub counts the ones it skipped), so a slow model
never holds up the lesson's encoder. Every model call runs in the service's own
one-thread executor, never on the event loop. A lesson (hosted or joined, from the
stream) opens an :class:`Attendance`; its end seals the per-student record into the
encrypted store and publishes the counts. Models that fail to load leave the service
``failed`` in health, with the reason; the lesson goes on.

What goes over MQTT (``{prefix}/{site}/{room}/sensing``, QoS 1, through the outbox): head
count, present count, unknown count per minute, and attendance counts at a lesson's end.
Never names, student ids, boxes, embeddings or images.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from agent.capture import FrameHub
from agent.config import AgentConfig, SensingConfig, period_minutes
from agent.sensing.attendance import Attendance
from agent.sensing.faces import Image
from agent.sensing.models import ModelError
from agent.sensing.pipeline import STAGES, FaceResult, Gallery, Pipeline
from agent.sensing.roster import STORE_FILE, RosterError, RosterStore, open_store

log = logging.getLogger(__name__)

MINUTE_S = 60.0
PERIOD_ID = "no-lesson"  # samples outside a lesson count for head count only


class Publisher(Protocol):
    async def send(self, topic: str, payload: Any, kind: Any = "event") -> Any: ...


class SensingService:
    """A supervisor service (``name`` + ``run()``) and a health source."""

    name = "sensing"
    health_section_name = "sensing"

    def __init__(
        self,
        config: SensingConfig,
        video: FrameHub,
        publisher: Publisher,
        topic: str,
        *,
        device: str,
        lesson: Callable[[], str | None],
        store_dir: Path,
        minute_s: float = MINUTE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.video = video
        self.publisher = publisher
        self.topic = topic
        self.device = device
        self.lesson = lesson
        self.store_dir = store_dir
        self.minute_s = minute_s
        self.clock = clock
        self.state = "starting"
        self.reason = ""
        self.pipeline: Pipeline | None = None
        self.store: RosterStore | None = None
        self.attendance: Attendance | None = None
        self.samples = 0
        self.faces_now = 0
        self.published = 0
        self._rate: list[float] = []
        self._skipped = 0
        self._minute_started = 0.0
        self._lesson_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stamp: float | None = None
        # Further per-sample analyses (head pose, hand raising: part 2) run here, in the
        # worker thread, on the same frame and tracked faces: (time, BGR image, faces).
        self.observers: list[Callable[[float, Image, list[FaceResult]], None]] = []

    # -- health -----------------------------------------------------------------------

    def health_section(self) -> dict[str, Any] | None:
        pipeline = self.pipeline
        now = time.monotonic()
        recent = [t for t in self._rate if now - t <= 10.0]
        span = (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
        return {
            "state": self.state,
            "reason": self.reason,
            "models": [] if pipeline is None else [m["name"] for m in pipeline.models()],
            "target_fps": self.config.sample_fps,
            "fps": round((len(recent) - 1) / span, 2) if span > 0 else 0.0,
            "latency_ms": (
                dict.fromkeys(STAGES, 0.0) if pipeline is None else pipeline.times.mean_ms()
            ),
            "samples": self.samples,
            "skipped": self._skipped,
            "embeddings": 0 if pipeline is None else pipeline.times.embeddings,
            "head_count": self.faces_now,
            "enrolled": 0 if self.store is None else len(self.store.gallery(1.0).students),
            "in_lesson": self._lesson_id is not None,
            "published": self.published,
        }

    # -- running ----------------------------------------------------------------------

    def _lower_priority(self) -> None:
        """Runs in the worker thread: on Linux a thread has its own nice value, and with
        one intra-op thread onnxruntime computes in this thread, so the lesson wins."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.nice)
        except (OSError, AttributeError) as exc:  # another OS, or not allowed
            log.debug("sensing thread keeps its priority: %s", exc)

    def _store_stamp(self) -> float | None:
        try:
            return (self.store_dir / STORE_FILE).stat().st_mtime
        except OSError:
            return None

    def _open_store(self) -> Gallery | None:
        self._stamp = self._store_stamp()
        try:
            self.store = open_store(self.store_dir, key_file=self.config.key_file)
        except RosterError as exc:
            # No roster: head count only. A store that exists but cannot be opened is
            # worth saying loudly; a room that never enrolled anyone is not.
            self.store = None
            level = logging.WARNING if self._stamp is not None else logging.INFO
            log.log(level, "sensing without a roster (head count only): %s", exc)
            return None
        return self.store.gallery(self.config.match_distance)

    def _load(self) -> Pipeline:
        gallery = self._open_store()
        return Pipeline(self.config, gallery=gallery, identify=gallery is not None)

    def _refresh_roster(self) -> None:
        """At a lesson's start: take a roster enrolled (or changed) since the last one."""
        if self.pipeline is None or self._store_stamp() == self._stamp:
            return
        gallery = self._open_store()
        if gallery is None:
            return
        try:
            self.pipeline.use_gallery(gallery)
        except ModelError as exc:
            log.error("sensing: cannot identify students (%s); head count only", exc)
            return
        log.info("sensing: roster reloaded, %d students", len(gallery.students))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        executor = self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sensing", initializer=self._lower_priority
        )
        subscription = None
        try:
            self.state, self.reason = "loading", ""
            try:
                self.pipeline = await loop.run_in_executor(executor, self._load)
            except ModelError as exc:
                self.state, self.reason = "failed", str(exc)
                log.error("sensing failed: %s; the lesson goes on without it", exc)
                return
            self.state = "running"
            log.info(
                "sensing running at %.1f fps (%s)",
                self.config.sample_fps,
                ", ".join(m["name"] for m in self.pipeline.models()),
            )
            subscription = self.video.subscribe("sensing")
            self._minute_started = self.clock()
            period = 1.0 / self.config.sample_fps
            next_due = time.monotonic()
            while True:
                delay = next_due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                frame = await subscription.get()
                next_due = max(next_due + period, time.monotonic())
                now = self.clock()
                await self._follow_lesson(now)
                results = await loop.run_in_executor(executor, self._analyse, frame.image, now)
                self._after_sample(now, results)
                self._skipped = subscription.stats().skipped
                if now - self._minute_started >= self.minute_s:
                    await self._publish_minute(now)
        finally:
            if subscription is not None:
                subscription.close()
            await self._end_lesson(self.clock(), shielded=True)
            executor.shutdown(wait=True, cancel_futures=True)
            if self.state != "failed":
                self.state = "stopped"

    def _analyse(self, image: Image, now: float) -> list[FaceResult]:
        """One sample, in the worker thread: the pipeline, then every observer."""
        assert self.pipeline is not None
        results = self.pipeline.frame(image, now)
        for observer in self.observers:
            try:
                observer(now, image, results)
            except Exception:  # one analysis failing must not stop attendance
                log.exception("sensing observer %r failed", observer)
        return results

    def _after_sample(self, now: float, results: list[FaceResult]) -> None:
        assert self.pipeline is not None
        self.samples += 1
        self.faces_now = len(results)
        self._rate.append(time.monotonic())
        del self._rate[:-64]
        ended = self.pipeline.tracker.drain_ended()
        if self.attendance is not None:
            self.attendance.tracks_ended(ended)
            self.attendance.observe(now, [r.track for r in results if r.track is not None])

    async def _follow_lesson(self, now: float) -> None:
        lesson = self.lesson()
        if lesson == self._lesson_id:
            if self.attendance is None:
                self._open(PERIOD_ID if lesson is None else lesson, now)
            return
        await self._end_lesson(now)
        self._lesson_id = lesson
        if lesson is not None and self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._refresh_roster)
        self._open(PERIOD_ID if lesson is None else lesson, now)

    def _open(self, lesson_id: str, now: float) -> None:
        enrolled = set() if self.store is None else self.store.gallery(1.0).students
        self.attendance = Attendance(self.config, lesson_id, now, enrolled)
        self._minute_started = now
        if lesson_id != PERIOD_ID:
            log.info("sensing: lesson %s started, %d enrolled", lesson_id, len(enrolled))

    async def _publish_minute(self, now: float) -> None:
        if self.attendance is None:
            return
        body = self.attendance.take_minute(now)
        self._minute_started = now
        await self._send({"kind": "minute", **body})

    async def _send(self, body: dict[str, Any]) -> None:
        lesson = None if self._lesson_id is None else self._lesson_id
        message = {"v": 1, "ts": self.clock(), "device": self.device, "lesson": lesson, **body}
        await self.publisher.send(self.topic, message, "event")
        self.published += 1

    async def _end_lesson(self, now: float, *, shielded: bool = False) -> None:
        attendance, self.attendance = self.attendance, None
        if attendance is None:
            return
        tail = attendance.take_minute(now) if attendance.minute.samples else None
        if self.pipeline is not None:
            attendance.tracks_ended(self.pipeline.tracker.close_all())
        if attendance.lesson_id == PERIOD_ID:
            if tail is not None and not shielded:
                await self._send({"kind": "minute", **tail})
            return
        record = attendance.finish(now)
        if self.store is not None and attendance.enrolled:
            path = await asyncio.to_thread(  # a synchronous, fsynced write
                self.store.seal_record, attendance.lesson_id, record
            )
            log.info("sensing: lesson %s attendance sealed in %s", attendance.lesson_id, path)
        counts = {
            "kind": "attendance",
            **record["counts"],
            "unknown": record["unknown"],
            "enrolled": len(attendance.enrolled),
        }
        sends = [counts] if tail is None else [{"kind": "minute", **tail}, counts]
        for body in sends:
            if shielded:  # stopping: the outbox keeps it, even if the stop is a cancel
                await asyncio.shield(self._send(body))
            else:
                await self._send(body)


def period_id(periods: list[str], now: datetime.datetime) -> str | None:
    """The sensing-only period ``now`` falls in, as an id ('period-20261204-0800'), or None."""
    minute = now.hour * 60 + now.minute
    for period in periods:
        start, end = period_minutes(period)
        if start <= minute < end:
            return f"period-{now:%Y%m%d}-{start // 60:02d}{start % 60:02d}"
    return None


def sensing_service(
    config: AgentConfig,
    video: FrameHub,
    publisher: Publisher,
    topic: str,
    live_lesson: Callable[[], tuple[str, str] | None],
) -> SensingService | None:
    """The composition's builder: None while ``sensing.enabled`` is false (the default)."""
    sensing = config.sensing
    if not sensing.enabled:
        return None

    def lesson() -> str | None:
        live = live_lesson()
        if live is not None:
            return live[0]
        return period_id(sensing.periods, datetime.datetime.now())

    return SensingService(
        sensing,
        video,
        publisher,
        topic,
        device=config.identity.device_id,
        lesson=lesson,
        store_dir=sensing.roster_dir or config.supervisor.state_dir / "sensing",
    )

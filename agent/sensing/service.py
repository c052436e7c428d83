"""The sensing service: samples the camera, runs the pipeline in a worker thread, keeps
attendance per lesson and publishes per-minute aggregates (counts only).

Frames come from ``FrameHub.subscribe()``: the service sleeps until the next sample is
due, then takes the newest frame (the hub counts the ones it skipped), so a slow model
never holds up the lesson's encoder. Every model call runs in the service's own
one-thread executor, never on the event loop. A lesson (hosted or joined, from the
stream) opens an :class:`Attendance`; its end seals the per-student record into the
encrypted store and publishes the counts. Models that fail to load leave the service
``failed`` in health, with the reason; the lesson goes on.

Talk (``sensing.talk_analysis``, with a microphone): the service also subscribes to the
``AudioHub`` and feeds its blocks, in the same worker thread, to the streaming Silero VAD
with the teacher-vs-class rule (:mod:`agent.sensing.talk_live`); where the room plays (the
echo canceller's ``FarEndReference`` exists and is playing) what was played over the same
samples is the loudspeaker reference. At a lesson's end the S-T figures are published.

Hands (``sensing.hand_raising``): an observer of each sample reads MoveNet keypoints on a
budget of regions (:mod:`agent.sensing.hands`) and counts hand raises per minute. Its
model failing to load turns hand raising off (``sensing.hands`` in health says why); the
faces go on. With ``sensing.raise_room_hand``, a hand raise in a receiving room's live
lesson calls ``raise_hand`` (the composition's: the stream joiner's ``set_hand``, as the
room's panel button does), in a task the service owns.

What goes over MQTT (``{prefix}/{site}/{room}/sensing``, QoS 1, through the outbox): head
count, present count, unknown count and hand raises per minute, attendance counts (with
the lesson's hand raises) and the S-T figures (Rt, Ch, mode, N, the T/S samples) at a
lesson's end. Never names, student ids, boxes,
embeddings, images or audio.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.capture import AudioChunk, AudioHub, FrameHub
from agent.config import AgentConfig, SensingConfig, period_minutes
from agent.sensing.attendance import Attendance
from agent.sensing.faces import Image
from agent.sensing.hands import HandRaising
from agent.sensing.models import ModelError
from agent.sensing.pipeline import STAGES, FaceResult, Gallery, Pipeline, heads_up
from agent.sensing.pose import PoseEstimator
from agent.sensing.privacy import purge_expired
from agent.sensing.report import attendance_aggregate, report_record
from agent.sensing.roster import (
    RECORD_KINDS,
    STORE_FILE,
    RosterError,
    RosterStore,
    open_store,
    store_directory,
)
from agent.sensing.st_analysis import StResult
from agent.sensing.talk import Role, SileroVad, TalkSettings
from agent.sensing.talk_live import LiveTalk

log = logging.getLogger(__name__)

MINUTE_S = 60.0
PERIOD_ID = "no-lesson"  # samples outside a lesson count for head count only
FEED_S = 0.5  # microphone audio handed to the worker thread at a time
TALK_QUEUE = 500  # microphone chunks the talk analysis may fall behind (10 s of 20 ms)
PURGE_EVERY_S = 86_400.0  # records past privacy.retention_days are removed daily
MAX_FAILURES = 10  # samples failing in a row before sensing gives up (and says so)
RAISE_HAND_S = 10.0  # raising the room's hand (one MQTT signal) gives up after this


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
        audio: AudioHub | None = None,
        role: Callable[[], Role] = lambda: "main",
        retention_days: int = 30,
        face_recognition: bool = True,
        raise_hand: Callable[[], Awaitable[None]] | None = None,
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
        self.retention_days = retention_days
        self.face_recognition = face_recognition
        self._purged_at: float | None = None
        self.state = "starting"
        self.reason = ""
        self.pipeline: Pipeline | None = None
        self.store: RosterStore | None = None
        self.attendance: Attendance | None = None
        self.samples = 0
        self.faces_now = 0
        self.published = 0
        self.errors = 0  # samples whose analysis raised
        self._failures = 0  # in a row
        self._rate: list[float] = []
        self._skipped = 0
        self._minute_started = 0.0
        self._lesson_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stamp: float | None = None
        self.audio = audio if config.talk_analysis else None
        self.role = role
        self.talk_state = "off" if self.audio is None else "starting"
        self.talk_reason = ""
        self.talk: LiveTalk | None = None
        self.talk_published = 0
        self._vad: SileroVad | None = None
        self._talk_role: Role | None = None  # set while a lesson wants its talk analysed
        self._talk_dropped = 0
        # Further per-sample analyses (hand raising, below) run here, in the worker
        # thread, on the same frame and tracked faces: (time, BGR image, faces).
        self.observers: list[Callable[[float, Image, list[FaceResult]], None]] = []
        self.hands: HandRaising | None = None
        self.hands_state = "starting" if config.hand_raising else "off"
        self.hands_reason = ""
        self._sample_hands: int | None = None  # raises the last sample completed
        self.raise_hand = raise_hand if config.raise_room_hand else None
        self._raising: asyncio.Task[None] | None = None
        self.room_hands = 0  # times a detected raise raised the room's hand

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
            "errors": self.errors,
            "talk": self._talk_health(),
            "hands": self._hands_health(),
        }

    def _hands_health(self) -> dict[str, Any]:
        hands = self.hands
        return {
            "state": self.hands_state,
            "reason": self.hands_reason,
            "min_s": self.config.hand_min_s,
            "regions_per_sample": 0.0 if hands is None else round(hands.regions_recent(), 2),
            "ms_per_region": 0.0 if hands is None else round(hands.ms_per_region(), 2),
            "events": 0 if hands is None else hands.events,
            "room_hands": self.room_hands,
        }

    def _talk_health(self) -> dict[str, Any]:
        talk = self.talk
        return {
            "state": self.talk_state,
            "reason": self.talk_reason,
            "role": self._talk_role,
            "heard_s": 0.0 if talk is None else round(talk.heard_s, 2),
            "reference": talk is not None and talk.referenced,
            "dropped": self._talk_dropped,
            "lessons": self.talk_published,
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
        # privacy.face_recognition false: head count and engagement, never an embedding.
        gallery = self._open_store() if self.face_recognition else None
        pipeline = Pipeline(self.config, gallery=gallery, identify=gallery is not None)
        if self.audio is not None:
            try:
                self._vad = SileroVad(models_dir=self.config.models_dir)
                self.talk_state = "idle"
            except ModelError as exc:  # the faces go on without the talk
                self.talk_state, self.talk_reason = "failed", str(exc)
                log.error("sensing: no talk analysis: %s", exc)
        if self.config.hand_raising:
            self._load_hands()
        return pipeline

    def _load_hands(self) -> None:
        """In the worker thread: the pose model, and hand raising as an observer."""
        try:
            estimator = PoseEstimator(
                models_dir=self.config.models_dir,
                threads=self.config.threads,
                provider=self.config.execution_provider,
            )
        except ModelError as exc:  # the faces go on without the hands
            self.hands_state, self.hands_reason = "failed", str(exc)
            log.error("sensing: no hand raising: %s", exc)
            return
        self.hands = HandRaising.from_config(self.config, estimator.keypoints)
        self.observers.append(self._observe_hands)
        self.hands_state = "running"

    def _observe_hands(self, now: float, image: Image, results: list[FaceResult]) -> None:
        """In the worker thread, after the pipeline: this sample's hand raises."""
        assert self.hands is not None
        self._sample_hands = len(self.hands.sample(now, image, results))

    def _refresh_roster(self) -> None:
        """At a lesson's start: take a roster enrolled (or changed) since the last one."""
        if self.pipeline is None or not self.face_recognition:
            return
        if self._store_stamp() == self._stamp:
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
        listening: asyncio.Task[None] | None = None
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
            if self._vad is not None:
                listening = asyncio.create_task(self._listen(executor), name="sensing.talk")
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
                try:
                    results = await loop.run_in_executor(executor, self._analyse, frame.image, now)
                except Exception as exc:  # a model failing on a frame must not stop the agent
                    if self._sample_failed(exc):
                        return
                    continue
                self._failures = 0
                self._after_sample(now, results)
                if self._purged_at is None or now - self._purged_at >= PURGE_EVERY_S:
                    self._purged_at = now
                    await loop.run_in_executor(executor, self._purge_expired, now)
                self._skipped = subscription.stats().skipped
                if now - self._minute_started >= self.minute_s:
                    await self._publish_minute(now)
        finally:
            if subscription is not None:
                subscription.close()
            if listening is not None:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)
            if self._raising is not None:
                self._raising.cancel()
                await asyncio.gather(self._raising, return_exceptions=True)
            await self._end_lesson(self.clock(), shielded=True)
            executor.shutdown(wait=True, cancel_futures=True)
            if self.state != "failed":
                self.state = "stopped"
            if self.hands_state == "running":
                self.hands_state = "stopped"
            if self.talk_state not in ("off", "failed"):
                self.talk_state = "stopped"

    def _sample_failed(self, exc: Exception) -> bool:
        """One sample's analysis raised: logged; True (stop sensing, report ``failed``)
        after MAX_FAILURES in a row, so a broken model cannot spin or take the agent down."""
        self._failures += 1
        self.errors += 1
        if self._failures == 1:
            log.warning("sensing: a sample failed (%s: %s)", type(exc).__name__, exc)
        if self._failures < MAX_FAILURES:
            return False
        self.state = "failed"
        self.reason = (
            f"{MAX_FAILURES} samples in a row failed, the last with {type(exc).__name__}: {exc}"
        )
        log.error("sensing stopped: %s; the lesson goes on without it", self.reason)
        return True

    # -- talk -------------------------------------------------------------------------

    async def _listen(self, executor: ThreadPoolExecutor) -> None:
        """Microphone chunks, with what the loudspeakers played over them, handed to the
        worker thread in FEED_S batches while a lesson is open (its talk object)."""
        assert self.audio is not None
        assert self._vad is not None
        loop = asyncio.get_running_loop()
        subscription = self.audio.subscribe("sensing", max_chunks=TALK_QUEUE)
        batch: list[tuple[AudioChunk, Any]] = []
        owner: LiveTalk | None = None
        try:
            while True:
                chunk = await subscription.get()
                self._talk_dropped = subscription.stats().dropped
                if self._talk_role is None:
                    batch.clear()
                    continue
                if self.talk is None:
                    self.talk = LiveTalk(
                        self._vad,
                        chunk.sample_rate,
                        role=self._talk_role,
                        settings=TalkSettings(teacher_dbfs=self.config.teacher_dbfs),
                        interval_s=self.config.st_interval_s,
                    )
                    self.talk_state = "listening"
                if self.talk is not owner:  # a new lesson: the old one's tail is dropped
                    batch.clear()
                    owner = self.talk
                batch.append((chunk, self._played(chunk)))
                if sum(c.duration_s for c, _ in batch) >= FEED_S:
                    blocks, batch = batch, []
                    await loop.run_in_executor(executor, self._hear, owner, blocks)
        finally:
            subscription.close()

    def _played(self, chunk: AudioChunk) -> Any:
        """What the loudspeakers played over ``chunk``'s samples (a copy; None when the
        room plays nothing: no echo reference, or none heard in the last second)."""
        assert self.audio is not None
        processor = self.audio.processor
        reference = None if processor is None else processor.reference
        if reference is None or not reference.playing(chunk.captured_ns):
            return None
        if reference.rate != chunk.sample_rate:
            return None
        count = int(chunk.samples.shape[0])
        return reference.read(chunk.captured_ns - count * 1e9 / chunk.sample_rate, count)

    @staticmethod
    def _hear(talk: LiveTalk, blocks: list[tuple[AudioChunk, Any]]) -> None:
        """In the worker thread: one batch of microphone blocks into the lesson's talk."""
        mic = np.concatenate(
            [c.samples.astype(np.float32).mean(axis=1) / 32768.0 for c, _ in blocks]
        )
        reference = None
        if any(played is not None for _, played in blocks):
            reference = np.concatenate(
                [
                    np.zeros(c.samples.shape[0], np.float32) if played is None else played
                    for c, played in blocks
                ]
            )
        talk.feed(mic.astype(np.float32), reference)

    async def _talk_result(self) -> StResult | None:
        talk, self.talk, self._talk_role = self.talk, None, None
        if self.talk_state == "listening":
            self.talk_state = "idle"
        if talk is None:
            return None
        if self._executor is not None:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, talk.result)
        else:
            result = talk.result()
        log.info(
            "sensing: lesson talk %.0f s, S-T %s (Rt %.2f, Ch %.2f, %s)",
            talk.heard_s,
            result.samples,
            result.rt,
            result.ch,
            result.mode,
            extra={"fields": {"role": talk.role, "reference": talk.referenced}},
        )
        return result if result.n else None

    def _analyse(self, image: Image, now: float) -> list[FaceResult]:
        """One sample, in the worker thread: the pipeline, then every observer."""
        assert self.pipeline is not None
        self._sample_hands = None  # stays None when hand raising is off or raised
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
        hands = self._sample_hands  # set by this sample's _analyse (None: not measured)
        if self.attendance is not None:
            self.attendance.tracks_ended(ended)
            self.attendance.observe(
                now,
                [r.track for r in results if r.track is not None],
                heads_up=heads_up(results, self.config),
                hand_raises=hands,
            )
        if hands and self.raise_hand is not None and self.role() == "receiving":
            self._raise_room_hand()

    def _raise_room_hand(self) -> None:
        """A hand raise in a receiving room's live lesson: raise the room's hand on the
        main teacher's panel (one call at a time; a failure is logged, never raised)."""
        if self._raising is not None and not self._raising.done():
            return
        self._raising = asyncio.create_task(self._call_raise_hand(), name="sensing.raise-hand")

    async def _call_raise_hand(self) -> None:
        assert self.raise_hand is not None
        try:
            await asyncio.wait_for(self.raise_hand(), RAISE_HAND_S)
        except Exception as exc:  # no lesson any more, the link down: the teacher sees none
            log.warning("sensing: the room's hand was not raised: %s", exc)
            return
        self.room_hands += 1
        log.info("sensing: a hand raise raised the room's hand")

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
        if lesson_id != PERIOD_ID and self._vad is not None:
            self._talk_role = self.role()
        if lesson_id != PERIOD_ID:
            log.info("sensing: lesson %s started, %d enrolled", lesson_id, len(enrolled))

    def _records_store(self) -> RosterStore:
        """The store the lesson records go in: the roster's, or (a room with no roster) one
        created for them, with its own key."""
        return self.store or open_store(self.store_dir, key_file=self.config.key_file, create=True)

    def _purge_expired(self, now: float) -> None:
        """Records older than privacy.retention_days go (at start, then daily)."""
        if not any((self.store_dir / kind).is_dir() for kind in RECORD_KINDS):
            return
        try:
            purge_expired(self._records_store(), self.retention_days, now)
        except (RosterError, OSError) as exc:
            log.error("sensing: expired records not purged: %s", exc)

    def _seal_report(self, lesson_id: str, report: dict[str, Any]) -> None:
        """Seal the lesson's report beside the attendance."""
        try:
            path = self._records_store().seal_record(lesson_id, report, "report")
        except (RosterError, OSError) as exc:
            log.error("sensing: lesson %s report not kept: %s", lesson_id, exc)
            return
        log.info("sensing: lesson %s report sealed in %s", lesson_id, path)

    async def _publish_minute(self, now: float) -> None:
        if self.attendance is None:
            return
        body = self.attendance.take_minute(now)
        self._minute_started = now
        await self._send({"kind": "minute", **body})

    async def _send(self, body: dict[str, Any]) -> None:
        message = sensing_message(self.device, self._lesson_id, body, self.clock())
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
        talk_role = self._talk_role
        st = await self._talk_result()
        record = attendance.finish(now)
        if self.store is not None and attendance.enrolled:
            path = await asyncio.to_thread(  # a synchronous, fsynced write
                self.store.seal_record, attendance.lesson_id, record
            )
            log.info("sensing: lesson %s attendance sealed in %s", attendance.lesson_id, path)
        report = report_record(
            record,
            attendance.summary(),
            st,
            room=self.device,
            role=talk_role or self.role(),
            hands=attendance.hands(),
        )
        await asyncio.to_thread(self._seal_report, attendance.lesson_id, report)
        counts = attendance_aggregate(report)
        sends: list[dict[str, Any]] = [] if tail is None else [{"kind": "minute", **tail}]
        if st is not None:
            sends.append({"kind": "st", "role": talk_role, **st.to_dict()})
            self.talk_published += 1
        sends.append(counts)  # last: its arrival says the lesson's messages are all in
        for body in sends:
            if shielded:  # stopping: the outbox keeps it, even if the stop is a cancel
                await asyncio.shield(self._send(body))
            else:
                await self._send(body)


def sensing_message(
    device: str, lesson: str | None, body: dict[str, Any], ts: float
) -> dict[str, Any]:
    """A message for the room's sensing topic (``schemas/sensing.v1.json``): ``body``
    (its ``kind`` and figures) stamped with the room, the lesson and the time."""
    return {"v": 1, "ts": ts, "device": device, "lesson": lesson, **body}


async def announce_correction(
    publisher: Publisher, topic: str, device: str, report: dict[str, Any]
) -> None:
    """After a teacher's correction on the panel: the lesson's attendance message again,
    with the corrected counts, so the fleet's figures agree with the report (through the
    outbox like every sensing message; sensing itself may be off by now)."""
    message = sensing_message(device, report["lesson"], attendance_aggregate(report), time.time())
    await publisher.send(topic, message, "event")


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
    *,
    audio: AudioHub | None = None,
    raise_hand: Callable[[], Awaitable[None]] | None = None,
) -> SensingService | None:
    """The composition's builder: None while ``sensing.enabled`` is false (the default).
    ``raise_hand`` raises the room's hand in its live lesson (used with
    ``sensing.raise_room_hand``)."""
    sensing = config.sensing
    if not sensing.enabled:
        return None
    device = config.identity.device_id

    def lesson() -> str | None:
        live = live_lesson()
        if live is not None:
            return live[0]
        return period_id(sensing.periods, datetime.datetime.now())

    def role() -> Role:
        # the teacher is in the room unless the live lesson is hosted by another room
        live = live_lesson()
        return "receiving" if live is not None and live[1] != device else "main"

    return SensingService(
        sensing,
        video,
        publisher,
        topic,
        device=device,
        lesson=lesson,
        store_dir=store_directory(config),
        audio=audio,
        role=role,
        retention_days=config.privacy.retention_days,
        face_recognition=config.privacy.face_recognition,
        raise_hand=raise_hand,
    )

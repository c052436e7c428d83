"""Recording a lesson: each room keeps its own copy, ``record_dir/<lesson_id>-<device>.mkv``.

* The **main room** records what it sends: the shared encoder's H.264 packets,
  stream-copied (a ``SharedH264Encoder.track("record/...")`` like any peer's: no second
  encode), and its microphone (an AudioHub subscription) encoded to Opus.
* A **receiving room** records what it received from the main room, as a
  :class:`~agent.stream.sinks.FrameObserver`: the decoded pictures re-encoded with
  libx264 (ultrafast, a modest bitrate) and the decoded sound encoded to Opus.

Matroska rather than MP4: an MP4 is unreadable until its index is written at the end,
while a Matroska file cut short by a crash or power loss plays up to its last complete
cluster; clusters are closed every ``cluster_ms`` (1 s), which bounds what a crash loses.

Nothing here runs on the event loop but a copy: packets' bytes, audio samples and
references to decoded pictures go into a bounded queue, and one worker thread per
recording encodes and muxes. When the queue is full, video is dropped (counted; in the
main room until the next keyframe, so the file stays decodable) and audio is kept. Shared
objects are never changed: packets are copied into new ones, pictures are copied or
converted with the recorder's own reformatter before it sets their timestamps.

A directory that cannot be written, or a disk that fills up, is logged once with the
setting to fix (``stream.record_dir``); the recording stops and the lesson goes on.
Files are created with mode 0o640 (the lesson is personal data: not world-readable).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError
from numpy.typing import NDArray

from agent.capture import AudioHub
from agent.stream.controls import MediaControls
from agent.stream.encoder import VIDEO_CLOCK_HZ, EncodedVideoTrack, SharedH264Encoder

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
OPUS_FRAME = 960  # 20 ms
AUDIO_GAP_S = 0.1  # a longer hole in the sound is filled with silence, keeping A/V sync
FILE_MODE = 0o640

RecorderState = Literal["idle", "recording", "failed"]


@dataclass(frozen=True, slots=True)
class RecorderSettings:
    """How a recording is made; the defaults suit a 2-core classroom PC."""

    video_kbps: int = 1000  # receiving room's re-encode (the main room copies its stream)
    preset: str = "ultrafast"
    keyframe_interval_s: float = 2.0
    audio_kbps: int = 64
    queue_items: int = 90  # about 1.5 s of 30 fps video with its audio
    cluster_ms: int = 1000  # what a crash can lose at most
    video_wait_s: float = 3.0  # a file with no picture by then is recorded audio-only


@dataclass(frozen=True, slots=True)
class RecordingSummary:
    lesson_id: str
    path: Path
    duration_s: float
    video_frames: int
    audio_frames: int  # Opus frames (20 ms each) written
    dropped: int  # video frames/packets the queue could not take (and audio, if ever)
    bytes: int
    error: str | None  # why the recording stopped early (None: it did not)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lesson_id": self.lesson_id,
            "path": str(self.path),
            "duration_s": round(self.duration_s, 2),
            "video_frames": self.video_frames,
            "audio_frames": self.audio_frames,
            "dropped": self.dropped,
            "bytes": self.bytes,
            "error": self.error,
        }


@dataclass(slots=True)
class _Packet:
    data: bytes
    pts: int  # the shared encoder's, 1/90000
    keyframe: bool
    arrived_ns: int


@dataclass(slots=True)
class _Picture:
    frame: Any  # a shared decoded av.VideoFrame: read only
    arrived_ns: int


@dataclass(slots=True)
class _Sound:
    data: NDArray[Any]  # private (or read-only shared) samples as to_ndarray() lays them out
    format: str
    layout: str
    rate: int
    start_ns: int  # monotonic time of its first sample


_Item = _Packet | _Picture | _Sound


class _Recording:
    """One file being written: the queue, the worker thread and its figures."""

    def __init__(
        self, lesson_id: str, path: Path, settings: RecorderSettings, has_video: bool
    ) -> None:
        self.lesson_id = lesson_id
        self.path = path
        self.settings = settings
        self.has_video = has_video  # main room: an encoder; receiving room: decided at open
        self.origin_ns = time.monotonic_ns()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.queue: deque[_Item] = deque()
        self.closing = False
        self.failed = threading.Event()
        self.error: str | None = None
        self.need_keyframe = True  # main room: drop packets until a keyframe
        self.video_frames = 0
        self.audio_frames = 0
        self.dropped = 0
        self.video_end_s = 0.0
        self.thread = threading.Thread(target=self._work, name="lesson-recorder", daemon=True)
        # Worker-only state.
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._size: tuple[int, int] | None = None
        self._reformatter: Any = None
        self._resampler: Any = None
        self._audio_pts: int | None = None
        self._base: tuple[int, int] | None = None  # (first packet pts, its file pts)
        self._last_video_pts = -1

    # -- the loop side -----------------------------------------------------------------------

    def put(self, item: _Item) -> None:
        """Queue ``item`` for the worker; never blocks."""
        if self.failed.is_set() or self.closing:
            return
        with self.lock:
            video = not isinstance(item, _Sound)
            if isinstance(item, _Packet):
                if self.need_keyframe and not item.keyframe:
                    self.dropped += 1
                    return
                self.need_keyframe = False
            limit = self.settings.queue_items
            if video and len(self.queue) >= limit:
                self.dropped += 1
                if isinstance(item, _Packet):
                    self.need_keyframe = True  # the stream copy is broken until then
                return
            if len(self.queue) >= 2 * limit:  # audio is kept over video, up to a point
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(item)
            self.wake.notify()

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.wake.notify()

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        pending: list[_Item] = []
        try:
            while True:
                with self.lock:
                    if not self.queue and not self.closing:
                        self.wake.wait(0.2)
                    items = list(self.queue)
                    self.queue.clear()
                    closing = self.closing
                if self._container is None:
                    pending += items
                    if not self._ready(pending, closing):
                        if closing:
                            break
                        continue
                    self._open(pending)
                    items, pending = pending, []
                for item in items:
                    self._write(item)
                if closing and not self.queue:
                    break
            self._finish()
        except Exception as exc:
            self._fail(exc)

    def _ready(self, pending: list[_Item], closing: bool) -> bool:
        """Open the file once its first picture is here (its size decides the stream), or
        audio-only once ``video_wait_s`` passed without one."""
        if any(not isinstance(i, _Sound) for i in pending):
            return True
        waited_s = (time.monotonic_ns() - self.origin_ns) / 1e9
        has_sound = any(isinstance(i, _Sound) for i in pending)
        if has_sound and (closing or waited_s >= self.settings.video_wait_s):
            if self.has_video:
                log.warning(
                    "recording %s: no picture after %.0f s; recording sound only",
                    self.path,
                    waited_s,
                )
            self.has_video = False
            return True
        return False

    def _open(self, pending: list[_Item]) -> None:
        cfg = self.settings
        first = next((i for i in pending if not isinstance(i, _Sound)), None)
        container: Any = av.open(
            str(self.path),
            "w",
            format="matroska",
            # Clusters closed every cluster_ms and handed to the kernel at once (not
            # left in the 32 kB I/O buffer): what a crash loses is that much, no more.
            options={"cluster_time_limit": str(cfg.cluster_ms), "flush_packets": "1"},
        )
        self._container = container
        if isinstance(first, _Packet):
            width, height = _h264_size(first.data)
            self._video = container.add_mux_stream(
                "h264", width=width, height=height, time_base=VIDEO_TIME_BASE
            )
        elif isinstance(first, _Picture):
            width, height = first.frame.width & ~1, first.frame.height & ~1
            self._size = (width, height)
            fps = 30
            stream = container.add_stream("libx264", rate=fps)
            ctx = stream.codec_context
            ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
            ctx.time_base = VIDEO_TIME_BASE
            stream.time_base = VIDEO_TIME_BASE
            ctx.bit_rate = cfg.video_kbps * 1000
            keyint = max(1, round(cfg.keyframe_interval_s * fps))
            ctx.options = {
                "preset": cfg.preset,
                "tune": "zerolatency",
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:"
                f"vbv-maxrate={cfg.video_kbps}:vbv-bufsize={cfg.video_kbps}",
            }
            self._video = stream
            self._reformatter = av.video.reformatter.VideoReformatter()
        audio = container.add_stream("libopus", rate=AUDIO_RATE, layout="stereo")
        audio.codec_context.bit_rate = cfg.audio_kbps * 1000
        self._audio = audio
        self._resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=AUDIO_RATE, frame_size=OPUS_FRAME
        )
        log.info(
            "recording lesson %s into %s (%s)",
            self.lesson_id,
            self.path,
            "video + audio" if self._video is not None else "audio only",
        )

    def _write(self, item: _Item) -> None:
        if isinstance(item, _Sound):
            self._write_sound(item)
        elif self._video is None:
            return
        elif isinstance(item, _Packet):
            self._write_packet(item)
        else:
            self._write_picture(item)

    def _file_pts(self, at_ns: int) -> int:
        return max(0, (at_ns - self.origin_ns) * VIDEO_CLOCK_HZ // 1_000_000_000)

    def _write_packet(self, item: _Packet) -> None:
        # The shared encoder's pts follow capture time from its own origin; the file's
        # start at this recording's start, mapped once at the first packet's arrival.
        if self._base is None:
            self._base = (item.pts, self._file_pts(item.arrived_ns))
        pts = self._base[1] + item.pts - self._base[0]
        pts = max(pts, self._last_video_pts + 1)
        self._last_video_pts = pts
        packet = av.Packet(item.data)
        packet.pts = packet.dts = pts
        packet.time_base = VIDEO_TIME_BASE
        packet.is_keyframe = item.keyframe
        packet.stream = self._video
        self._container.mux(packet)
        self.video_frames += 1
        self.video_end_s = pts / VIDEO_CLOCK_HZ

    def _write_picture(self, item: _Picture) -> None:
        assert self._size is not None
        frame = self._own_copy(item.frame, *self._size)
        pts = max(self._file_pts(item.arrived_ns), self._last_video_pts + 1)
        self._last_video_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self.video_frames += 1
        self.video_end_s = pts / VIDEO_CLOCK_HZ

    def _own_copy(self, frame: Any, width: int, height: int) -> Any:
        """A picture this thread may stamp and encode: the shared one is never touched
        (PyAV's encode() rebases its time and reformat() caches state on it)."""
        if frame.format.name == "yuv420p" and (frame.width, frame.height) == (width, height):
            out = av.VideoFrame(width, height, "yuv420p")
            for src, dst, rows, cols in zip(
                frame.planes,
                out.planes,
                (height, height // 2, height // 2),
                (width, width // 2, width // 2),
                strict=True,
            ):
                a = np.frombuffer(memoryview(src), np.uint8).reshape(-1, src.line_size)
                b = np.frombuffer(memoryview(dst), np.uint8).reshape(-1, dst.line_size)
                b[:rows, :cols] = a[:rows, :cols]
            return out
        return self._reformatter.reformat(frame, width=width, height=height, format="yuv420p")

    def _write_sound(self, item: _Sound) -> None:
        start = (item.start_ns - self.origin_ns) * AUDIO_RATE // 1_000_000_000
        if self._audio_pts is None:
            self._audio_pts = max(0, start)
        elif start - self._audio_pts > AUDIO_GAP_S * AUDIO_RATE:
            # A hole (network loss, a stalled microphone): silence keeps the sound in
            # step with the picture; the encoder never sees a jump.
            gap = start - self._audio_pts
            silence = np.zeros((1, 2 * gap), np.int16)
            self._encode_sound(silence, "s16", "stereo", AUDIO_RATE)
        self._encode_sound(item.data, item.format, item.layout, item.rate)

    def _encode_sound(self, data: NDArray[Any], fmt: str, layout: str, rate: int) -> None:
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate = rate
        for out in self._resampler.resample(frame):
            self._mux_sound(out)

    def _mux_sound(self, frame: Any) -> None:
        assert self._audio_pts is not None
        frame.pts = self._audio_pts
        frame.time_base = AUDIO_TIME_BASE
        self._audio_pts += frame.samples
        for packet in self._audio.encode(frame):
            self._container.mux(packet)
        self.audio_frames += 1

    def _finish(self) -> None:
        container, self._container = self._container, None
        if container is None:
            return
        try:
            if self._resampler is not None and self._audio_pts is not None:
                for out in self._resampler.resample(None):
                    self._mux_sound(out)
            for stream in (self._video, self._audio):
                if stream is not None and stream.codec_context is not None:
                    for packet in stream.encode(None):
                        container.mux(packet)
        finally:
            container.close()

    def _fail(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.failed.set()
        log.error(
            "recording lesson %s into %s failed (%s); recording stopped, the lesson goes "
            "on. Free space in stream.record_dir (%s), make it writable by the agent's "
            "user, or point stream.record_dir elsewhere",
            self.lesson_id,
            self.path,
            self.error,
            self.path.parent,
        )
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()
        with self.lock:
            self.queue.clear()

    def duration_s(self) -> float:
        audio = 0.0 if self._audio_pts is None else self._audio_pts / AUDIO_RATE
        return max(self.video_end_s, audio)


def _h264_size(data: bytes) -> tuple[int, int]:
    """The picture size of an H.264 keyframe (decoded once, for the stream's header)."""
    decoder: Any = av.CodecContext.create("h264", "r")
    for frame in decoder.decode(av.Packet(data)):
        return int(frame.width), int(frame.height)
    for frame in decoder.decode(None):
        return int(frame.width), int(frame.height)
    raise ValueError("the first recorded keyframe does not decode")


class LessonRecorder:
    """Records this room's copy of each lesson (one at a time).

    Main room: pass ``encoder`` (its stream is copied) and/or ``microphone``; the
    recorder reads them itself while recording. Receiving room: pass neither and add the
    recorder to the room's :class:`~agent.stream.sinks.FanOutSink`; it records the
    video and audio of one source (``start(..., source=main_room)``, or the first source
    it sees). ``controls``: the room's mute switches (a muted microphone is recorded as
    silence; a muted camera is already a slate in the encoder's stream).
    """

    def __init__(
        self,
        record_dir: Path,
        device_id: str,
        *,
        encoder: SharedH264Encoder | None = None,
        microphone: AudioHub | None = None,
        controls: MediaControls | None = None,
        settings: RecorderSettings | None = None,
    ) -> None:
        self.record_dir = Path(record_dir)
        self.device_id = device_id
        self.encoder = encoder
        self.microphone = microphone
        self.controls = controls
        self.settings = settings or RecorderSettings()
        self.mode: Literal["main", "receiving"] = (
            "main" if encoder is not None or microphone is not None else "receiving"
        )
        self.error: str | None = None  # why the last recording failed or did not start
        self.last: RecordingSummary | None = None
        self._rec: _Recording | None = None
        self._source: str | None = None
        self._track: EncodedVideoTrack | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def state(self) -> RecorderState:
        rec = self._rec
        if rec is not None:
            return "failed" if rec.failed.is_set() else "recording"
        return "failed" if self.error else "idle"

    @property
    def path(self) -> Path | None:
        return None if self._rec is None else self._rec.path

    def path_for(self, lesson_id: str) -> Path:
        return self.record_dir / f"{lesson_id}-{self.device_id}.mkv"

    async def start(self, lesson_id: str, *, source: str | None = None) -> Path | None:
        """Start recording ``lesson_id`` (a recording already running is stopped
        first); the file's path, or None if it cannot be written (:attr:`error` says
        why; logged). ``source``: receiving room, whose media to record."""
        if self._rec is not None:
            await self.stop()
        self.error = None
        try:
            path = await asyncio.to_thread(self._create, lesson_id)
        except OSError as exc:
            self.error = (
                f"stream.record_dir: cannot create a recording in {self.record_dir} "
                f"({exc.strerror or exc}); make the directory writable by the agent's user "
                f"or point stream.record_dir elsewhere"
            )
            log.error("lesson %s is not recorded: %s", lesson_id, self.error)
            return None
        rec = _Recording(lesson_id, path, self.settings, has_video=self.encoder is not None)
        self._rec = rec
        self._source = source
        rec.thread.start()
        if self.encoder is not None:
            self._track = self.encoder.track(f"record/{lesson_id}")
            self._spawn(self._read_video(self._track, rec), "stream-record-video")
        if self.microphone is not None:
            self._spawn(self._read_microphone(self.microphone, rec), "stream-record-audio")
        return path

    def _create(self, lesson_id: str) -> Path:
        """Create the file (0o640, never replacing an earlier recording): proves now,
        not at the first picture, that the directory can be written."""
        self.record_dir.mkdir(parents=True, exist_ok=True)
        base = self.path_for(lesson_id)
        for n in range(1000):
            path = base if n == 0 else base.with_name(f"{base.stem}-{n}{base.suffix}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                continue
            os.fchmod(fd, FILE_MODE)
            os.close(fd)
            return path
        raise FileExistsError(f"too many recordings named {base.name}")

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> RecordingSummary | None:
        """Finish the file (idempotent); its summary, or None if nothing was recording."""
        rec, self._rec = self._rec, None
        if rec is None:
            return None
        if self._track is not None:
            self._track.stop()
            self._track = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        rec.close()
        await asyncio.to_thread(rec.thread.join)
        size = 0
        with contextlib.suppress(OSError):
            size = (await asyncio.to_thread(rec.path.stat)).st_size
        if rec.error is not None:
            self.error = rec.error
        summary = RecordingSummary(
            lesson_id=rec.lesson_id,
            path=rec.path,
            duration_s=rec.duration_s(),
            video_frames=rec.video_frames,
            audio_frames=rec.audio_frames,
            dropped=rec.dropped,
            bytes=size,
            error=rec.error,
        )
        self.last = summary
        log.info(
            "recording of lesson %s: %s, %.1f s, %d video / %d audio frames, %d dropped",
            rec.lesson_id,
            rec.path,
            summary.duration_s,
            summary.video_frames,
            summary.audio_frames,
            summary.dropped,
        )
        return summary

    def stats(self) -> dict[str, Any]:
        """For the health topic: the recording now (or the last one)."""
        rec = self._rec
        if rec is None:
            return {
                "state": self.state,
                "error": self.error,
                "last": None if self.last is None else self.last.to_dict(),
            }
        return {
            "state": self.state,
            "path": str(rec.path),
            "lesson_id": rec.lesson_id,
            "duration_s": round(rec.duration_s(), 1),
            "video_frames": rec.video_frames,
            "audio_frames": rec.audio_frames,
            "dropped": rec.dropped,
            "error": rec.error,
        }

    # -- main room: reading its own media ----------------------------------------------------

    async def _read_video(self, track: EncodedVideoTrack, rec: _Recording) -> None:
        with contextlib.suppress(MediaStreamError):
            while not rec.failed.is_set():
                packet = await track.recv()
                pts = 0 if packet.pts is None else int(packet.pts)
                rec.put(_Packet(bytes(packet), pts, bool(packet.is_keyframe), _now()))
        track.stop()

    async def _read_microphone(self, hub: AudioHub, rec: _Recording) -> None:
        name = f"stream.record:{rec.lesson_id}"
        # RuntimeError: the hub closed the subscription (it stopped).
        with hub.subscribe(name, max_chunks=50) as sub, contextlib.suppress(RuntimeError):
            while not rec.failed.is_set():
                chunk = await sub.get()
                samples = chunk.samples
                if self.controls is not None and self.controls.microphone_muted:
                    samples = np.zeros_like(samples)
                layout = "mono" if chunk.channels == 1 else "stereo"
                start_ns = chunk.captured_ns - int(chunk.duration_s * 1e9)
                rec.put(_Sound(samples.reshape(1, -1), "s16", layout, chunk.sample_rate, start_ns))

    # -- receiving room: an observer ----------------------------------------------------------

    def observe(self, source: str, kind: str, frame: Any) -> None:
        rec = self._rec
        if rec is None or self.mode != "receiving":
            return
        if self._source is None:
            self._source = source
            log.info("recording lesson %s: media from %s", rec.lesson_id, source)
        elif source != self._source:
            return
        now = _now()
        if kind == "video":
            rec.put(_Picture(frame, now))
        elif kind == "audio":
            data = np.array(frame.to_ndarray(), copy=True)
            duration_ns = int(1e9 * frame.samples / max(1, frame.sample_rate))
            rec.put(
                _Sound(
                    data,
                    frame.format.name,
                    frame.layout.name,
                    int(frame.sample_rate),
                    now - duration_ns,
                )
            )

    def track_ended(self, source: str, kind: str) -> None:
        """Nothing to do: a reconnecting source goes on in the same file (the gap stays)."""


def _now() -> int:
    return time.monotonic_ns()

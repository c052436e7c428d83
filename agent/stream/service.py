"""A room's live-lesson machinery as one supervisor service, built from its config.

The runtime adds one :class:`StreamService` next to the hubs and the link. It runs the
signalling endpoint, the shared encoder (idle until a peer needs video), one
:class:`LessonHost` per group where this room is ``main`` and one :class:`LessonJoiner`
for the groups where it is ``receiving``, the loudspeakers (a receiving room hears only
its main room) and, with ``stream.record_dir``, this room's recording of each lesson;
if any of them fails, all restart together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from agent.capture import AudioHub, FrameHub
from agent.config import LessonRole, StreamConfig
from agent.stream import hooks
from agent.stream.controls import MediaControls
from agent.stream.encoder import EncoderSettings, SharedH264Encoder
from agent.stream.host import LessonHost
from agent.stream.joiner import LessonJoiner
from agent.stream.peer import IceSettings
from agent.stream.playback import AudioPlayback
from agent.stream.recorder import LessonRecorder
from agent.stream.signalling import Signalling
from agent.stream.sinks import FanOutSink, LatestFrames, MediaSink, ProbeSink
from agent.stream.voice import LinkTuning
from agent.sync import MqttLink

log = logging.getLogger(__name__)

LESSON_POLL_S = 0.5  # how soon a recording starts after the lesson does


class StreamService:
    """Signalling + encoder + lesson host(s) + joiner for one room.

    Who may join a group this room hosts is the group's ``receivers`` in the identity
    (config). ``host_addresses``: ICE host-candidate addresses (empty:
    every interface but loopback). ``sink``: where received media goes (None: drained).
    """

    name = "stream"
    health_section_name = "stream"

    def __init__(
        self,
        link: MqttLink,
        video: FrameHub | None,
        audio: AudioHub | None,
        config: StreamConfig,
        *,
        host_addresses: Sequence[str] = (),
        sink: MediaSink | None = None,
        encoder_settings: EncoderSettings | None = None,
        media_timeout_s: float = 6.0,
        playback: AudioPlayback | None = None,
        received: ProbeSink | None = None,
        board: LatestFrames | None = None,
    ) -> None:
        if config.video_codec != "h264":
            log.warning(
                "stream.video_codec %s: lessons send H.264 (encode once)", config.video_codec
            )
        if config.encoder != "libx264":
            log.warning("stream.encoder %s is not supported yet: using libx264", config.encoder)
        self.link = link
        self.controls = MediaControls()  # the panel's camera/microphone mute
        self.signalling = Signalling(link)
        settings = encoder_settings or EncoderSettings.from_config(config)
        self.encoder = (
            None if video is None else SharedH264Encoder(video, settings, controls=self.controls)
        )
        ice = IceSettings.of(config.ice_servers, host_addresses)
        tuning = LinkTuning.from_config(config.link)
        identity = link.identity
        self.hosts: dict[str, LessonHost] = {
            m.group: LessonHost(
                link,
                self.signalling,
                m.group,
                m.receivers,
                encoder=self.encoder,
                audio=audio,
                ice=ice,
                sink=sink,
                controls=self.controls,
                tuning=tuning,
            )
            for m in identity.groups
            if m.role is LessonRole.MAIN
        }
        receiving = [m.group for m in identity.groups if m.role is LessonRole.RECEIVING]
        self.joiner = (
            LessonJoiner(
                link,
                self.signalling,
                receiving,
                encoder=self.encoder,
                audio=audio,
                ice=ice,
                sink=sink,
                media_timeout_s=media_timeout_s,
                controls=self.controls,
                tuning=tuning,
            )
            if receiving
            else None
        )

        self.playback = playback
        if playback is not None and audio is not None and playback.reference is None:
            # What the loudspeakers play is the microphone's echo canceller reference.
            playback.reference = audio.echo_reference()
        # Observers of received media that others read: the stamps (glass-to-glass in
        # health) and the newest frame of each room (the panel's tiles, the kiosk).
        self.received = received
        self.board = board
        self.recorder: LessonRecorder | None = None
        if config.record_dir is not None:
            if self.hosts:  # its own lesson: the shared encoder's packets, copied
                self.recorder = LessonRecorder(
                    config.record_dir,
                    identity.device_id,
                    encoder=self.encoder,
                    microphone=audio,
                    controls=self.controls,
                )
            elif isinstance(sink, FanOutSink):  # what it received from the main room
                self.recorder = LessonRecorder(config.record_dir, identity.device_id)
                sink.add(self.recorder)
            else:
                log.warning("stream.record_dir is set but received media has no recorder")

    async def run(self) -> None:
        # A library version the private-API hooks were not verified on fails here, at
        # start, rather than as a frozen picture or stalled audio mid-lesson.
        hooks.check_versions()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.signalling.run(), name="stream-signalling")
            if self.playback is not None:
                tasks.create_task(self.playback.run(), name="stream-playback")
            if self.playback is not None or self.recorder is not None:
                tasks.create_task(self._follow_lessons(), name="stream-follow-lessons")
            if self.encoder is not None:
                tasks.create_task(self.encoder.run(), name="stream-encoder")
            for host in self.hosts.values():
                tasks.create_task(host.run(), name=f"stream-host-{host.group}")
            if self.joiner is not None:
                tasks.create_task(self.joiner.run(), name="stream-joiner")

    def health_section(self) -> dict[str, Any] | None:
        section = self.stats()
        if section is not None and self.received is not None:
            section["received"] = self.received.summary()
        return section

    def live_lesson(self) -> tuple[str, str] | None:
        """(lesson id, main room) of the lesson this room is in, if any."""
        for host in self.hosts.values():
            if host.lesson is not None:
                return host.lesson.lesson_id, host.lesson.main
        joiner = self.joiner
        if joiner is not None and joiner.lesson is not None:
            return joiner.lesson.lesson_id, joiner.lesson.main
        return None

    async def _follow_lessons(self) -> None:
        """Start and stop the recording with the lesson; a receiving room's loudspeakers
        play only its main room (its own microphone is never played back)."""
        current: tuple[str, str] | None = None
        try:
            while True:
                lesson = self.live_lesson()
                if lesson != current:
                    if current is not None and self.recorder is not None:
                        summary = await self.recorder.stop()
                        if summary is not None:
                            log.info("recorded lesson %s: %s", current[0], summary.to_dict())
                    current = lesson
                    if self.playback is not None and not self.hosts:
                        self.playback.only(None if lesson is None else lesson[1])
                    if lesson is not None and self.recorder is not None:
                        source = None if self.hosts else lesson[1]
                        await self.recorder.start(lesson[0], source=source)
                await asyncio.sleep(LESSON_POLL_S)
        finally:
            if self.recorder is not None:
                await self.recorder.stop()

    def host_for(self, group: str | None = None) -> LessonHost:
        """The lesson host of ``group`` (None: this room's only hosted group); the
        ``LookupError`` text says what to pass instead."""
        known = ", ".join(self.hosts) or "none"
        if group is None:
            if len(self.hosts) == 1:
                return next(iter(self.hosts.values()))
            if not self.hosts:
                raise LookupError("this room is not the main room of any lesson group")
            raise LookupError(f"group: this room hosts several groups ({known}); name one")
        host = self.hosts.get(group)
        if host is None:
            raise LookupError(f"group: this room is not the main room of {group!r} ({known})")
        return host

    def stats(self) -> dict[str, Any] | None:
        """The health topic's ``stream`` section: the live lesson, if any (contracts v1)."""
        section: dict[str, Any] | None = None
        for host in self.hosts.values():
            if host.lesson is not None:
                section = host.stats()
                break
        else:
            if self.joiner is not None and self.joiner.lesson is not None:
                section = self.joiner.stats()
        if section is not None:
            if self.playback is not None:
                section["playback"] = self.playback.stats().to_dict()
            if self.recorder is not None:
                section["recording"] = self.recorder.stats()
        return section

"""Live dual-teacher lessons over WebRTC (aiortc), signalled over the MQTT link.

The main room's :class:`LessonHost` announces a lesson and answers the receiving rooms'
offers; each receiving room's :class:`LessonJoiner` joins by itself and reconnects
while the lesson lasts. Video is encoded once (:class:`SharedH264Encoder`) however many
rooms watch; audio is Opus per peer. :class:`StreamService` wires it all for one room.
See ``agent/stream/host.py`` for the lifecycle and ``signalling.py`` for the wire
format and what is rejected.
"""

from agent.stream.announcement import Announcement, AnnouncementInvalid, LessonConflict
from agent.stream.audio import HubAudioTrack
from agent.stream.controls import MediaControls
from agent.stream.encoder import (
    EncodedVideoTrack,
    EncoderSettings,
    EncoderStats,
    LayerState,
    LayerStats,
    SharedH264Encoder,
    TrackStats,
    VideoLayer,
    low_layer_size,
)
from agent.stream.hooks import route_bitrate_estimates, route_keyframe_requests
from agent.stream.host import LessonHost, RoomStatus
from agent.stream.ice import gather, new_peer_connection
from agent.stream.joiner import JoinState, LessonJoiner
from agent.stream.layers import LayerControl, LayerPolicy, LayerPolicySettings
from agent.stream.peer import IceSettings, PeerSession, finish, h264_preferences
from agent.stream.playback import (
    AudioOutput,
    AudioPlayback,
    PlaybackStats,
    PyAudioOutput,
    WavFileOutput,
    open_playback,
)
from agent.stream.recorder import LessonRecorder, RecorderSettings, RecordingSummary
from agent.stream.service import StreamService
from agent.stream.signalling import (
    MAX_MESSAGE_BYTES,
    Signal,
    Signalling,
    SignalRejected,
    SignalType,
    parse_signal,
)
from agent.stream.sinks import (
    FanOutSink,
    FrameObserver,
    LatestFrames,
    MediaSink,
    NullSink,
    ProbeSink,
    ProbeStats,
)
from agent.stream.voice import LinkTuning, VoiceSettings

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Announcement",
    "AnnouncementInvalid",
    "AudioOutput",
    "AudioPlayback",
    "EncodedVideoTrack",
    "EncoderSettings",
    "EncoderStats",
    "FanOutSink",
    "FrameObserver",
    "HubAudioTrack",
    "IceSettings",
    "JoinState",
    "LatestFrames",
    "LayerControl",
    "LayerPolicy",
    "LayerPolicySettings",
    "LayerState",
    "LayerStats",
    "LessonConflict",
    "LessonHost",
    "LessonJoiner",
    "LessonRecorder",
    "LinkTuning",
    "MediaControls",
    "MediaSink",
    "NullSink",
    "PeerSession",
    "PlaybackStats",
    "ProbeSink",
    "ProbeStats",
    "PyAudioOutput",
    "RecorderSettings",
    "RecordingSummary",
    "RoomStatus",
    "SharedH264Encoder",
    "Signal",
    "SignalRejected",
    "SignalType",
    "Signalling",
    "StreamService",
    "TrackStats",
    "VideoLayer",
    "VoiceSettings",
    "WavFileOutput",
    "finish",
    "gather",
    "h264_preferences",
    "low_layer_size",
    "new_peer_connection",
    "open_playback",
    "parse_signal",
    "route_bitrate_estimates",
    "route_keyframe_requests",
]

"""Typed configuration for the whole agent.

Validated once, at the edge (see ``agent.config.loader``); the rest of the code trusts
these objects. The tree mirrors the YAML: ``capture.video.fps`` is
``AgentConfig.capture.video.fps``. Unknown keys are errors so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator

from agent import contracts
from agent.config.audio_processing import AudioProcessingConfig
from agent.config.base import StrictModel
from agent.config.link import LinkConfig
from agent.config.pushed import ProfilesConfig
from agent.config.sensing import SensingConfig

# Defined once in agent.contracts (every layer reads them); named here for the config.
RESERVED_SITES = contracts.RESERVED_SITES
SLUG_PATTERN = contracts.SLUG_PATTERN
DEVICE_ID_PATTERN = contracts.DEVICE_ID_PATTERN

Slug = Annotated[
    str,
    Field(
        pattern=SLUG_PATTERN,
        description="Lower-case letters, digits, '-' and '_' (it becomes part of MQTT topics)",
    ),
]


class LessonRole(StrEnum):
    MAIN = "main"
    RECEIVING = "receiving"


class GroupMembership(StrictModel):
    group: Slug = Field(description="Lesson group id shared by a main room and its receiving rooms")
    role: LessonRole = Field(description="'main' broadcasts the lesson, 'receiving' joins it")
    receivers: list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]] = Field(
        default_factory=list,
        description="For role 'main': device ids ('site.room') of the receiving rooms that "
        "may join this group's lessons",
    )

    @model_validator(mode="after")
    def _receivers_for_main_only(self) -> Self:
        if self.role is LessonRole.MAIN and not self.receivers:
            raise ValueError(
                f"group {self.group!r}: role 'main' needs 'receivers' (the device ids "
                "'site.room' of the rooms that join)"
            )
        if self.role is LessonRole.RECEIVING and self.receivers:
            raise ValueError(
                f"group {self.group!r}: only the main room lists 'receivers'; remove them here"
            )
        return self


class IdentityConfig(StrictModel):
    site: Slug = Field(description="School (site) id; first level under the topic prefix")
    room: Slug = Field(description="Room id, unique within the site")
    display_name: str | None = Field(
        default=None,
        max_length=80,
        description="Human-readable room name for panels and dashboards",
    )
    groups: list[GroupMembership] = Field(
        default_factory=list,
        description="Lesson groups this room belongs to, with its role in each",
    )

    @field_validator("site")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_SITES:
            raise ValueError(f"{value!r} is reserved for fleet-wide topics; choose another site id")
        return value

    @model_validator(mode="after")
    def _one_role_per_group(self) -> Self:
        seen: set[str] = set()
        for membership in self.groups:
            if membership.group in seen:
                raise ValueError(
                    f"group {membership.group!r} is listed twice; a room has one role per group"
                )
            seen.add(membership.group)
        return self

    @property
    def device_id(self) -> str:
        """Fleet-unique id: MQTT client id, username and topic owner."""
        return f"{self.site}.{self.room}"


class TlsConfig(StrictModel):
    ca_file: Path = Field(description="CA certificate that signed the broker's certificate (PEM)")
    cert_file: Path | None = Field(
        default=None, description="This device's client certificate (PEM), for mutual TLS"
    )
    key_file: Path | None = Field(default=None, description="Private key of cert_file (PEM)")
    check_hostname: bool = Field(
        default=True, description="Verify the broker's host name against its certificate"
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


BROKER_URL_PATTERN = re.compile(
    r"^(mqtt|mqtts)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+)(:(\d{1,5}))?$"
)


class BrokerConfig(StrictModel):
    url: str | None = Field(
        default=None,
        description=(
            "mqtt://host:port or mqtts://host:port. Empty: start the embedded Mosquitto on "
            "loopback (demo and single-room use)"
        ),
    )
    username: str | None = Field(default=None, description="Per-device broker user name")
    password: SecretStr | None = Field(
        default=None, description="Broker password (prefer password_file in production)"
    )
    password_file: Path | None = Field(
        default=None, description="File holding the broker password, readable only by the agent"
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; required for mqtts://")
    keepalive_s: int = Field(
        default=15, ge=5, le=600, description="MQTT keepalive; the Last Will fires after 1.5x this"
    )
    topic_prefix: Slug = Field(default="edu", description="First level of every topic")
    reconnect_min_s: float = Field(
        default=1.0, gt=0, le=60, description="First reconnect delay cap"
    )
    reconnect_max_s: float = Field(
        default=60.0, gt=0, le=3600, description="Largest reconnect delay (full jitter below it)"
    )

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not BROKER_URL_PATTERN.match(value):
            raise ValueError(f"must look like mqtt://host:1883 or mqtts://host:8883, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.url and self.url.startswith("mqtts://") and self.tls is None:
            raise ValueError("mqtts:// needs a 'tls' section with at least ca_file")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        return self

    @property
    def host(self) -> str | None:
        match = BROKER_URL_PATTERN.match(self.url or "")
        return match.group(2).strip("[]") if match else None

    @property
    def port(self) -> int | None:
        match = BROKER_URL_PATTERN.match(self.url or "")
        if not match:
            return None
        if match.group(4):
            return int(match.group(4))
        return 8883 if match.group(1) == "mqtts" else 1883


class VideoConfig(StrictModel):
    source: Literal["camera", "file", "synthetic"] = Field(
        default="synthetic",
        description="camera: V4L2 via OpenCV; file: looping video file; synthetic: stamped pattern",
    )
    device: str = Field(
        default="/dev/video0", description="Camera device path or index (source: camera)"
    )
    path: Path | None = Field(default=None, description="Video file to loop (source: file)")
    width: int = Field(default=1280, ge=160, le=3840, description="Frame width in pixels")
    height: int = Field(default=720, ge=120, le=2160, description="Frame height in pixels")
    fps: float = Field(default=30.0, ge=1, le=60, description="Frames per second")
    fourcc: Literal["MJPG", "YUYV", "H264", "any"] = Field(
        default="MJPG", description="Camera pixel format to negotiate (MJPG for 1080p over USB 2)"
    )

    @model_validator(mode="after")
    def _source_needs(self) -> Self:
        if self.source == "file" and self.path is None:
            raise ValueError("source 'file' needs 'path' (a video file to loop)")
        return self


class AudioConfig(StrictModel):
    source: Literal["device", "file", "synthetic"] = Field(
        default="synthetic",
        description="device: PyAudio input; file: looping WAV file; synthetic: tone + silence",
    )
    device: str | None = Field(
        default=None,
        description="PyAudio input device index or a substring of its name; empty: system default",
    )
    path: Path | None = Field(default=None, description="WAV file to loop (source: file)")
    sample_rate: int = Field(default=48000, description="Samples per second (WebRTC uses 48000)")
    channels: int = Field(default=1, ge=1, le=2, description="1 = mono, 2 = stereo")
    frame_ms: int = Field(default=20, description="Audio frame duration (Opus uses 20 ms)")
    processing: AudioProcessingConfig = Field(
        default_factory=AudioProcessingConfig,
        description="Echo cancellation, noise suppression and gain control on the microphone",
    )

    @field_validator("sample_rate")
    @classmethod
    def _known_rate(cls, value: int) -> int:
        if value not in (8000, 16000, 24000, 32000, 44100, 48000):
            raise ValueError(f"must be one of 8000, 16000, 24000, 32000, 44100, 48000, got {value}")
        return value

    @field_validator("frame_ms")
    @classmethod
    def _known_frame(cls, value: int) -> int:
        if value not in (10, 20, 40, 60):
            raise ValueError(f"must be one of 10, 20, 40, 60, got {value}")
        return value

    @model_validator(mode="after")
    def _source_needs(self) -> Self:
        if self.source == "file" and self.path is None:
            raise ValueError("source 'file' needs 'path' (a WAV file to loop)")
        return self


class CaptureConfig(StrictModel):
    video: VideoConfig = Field(default_factory=VideoConfig, description="Camera settings")
    audio: AudioConfig = Field(default_factory=AudioConfig, description="Microphone settings")
    stall_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=3.0,
        description="No frame for this long marks the device lost (detected within 3 s)",
    )
    frozen_after_s: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="Identical frames for this long mark the camera degraded",
    )
    retry_min_s: float = Field(default=0.5, gt=0, le=30, description="First reopen delay")
    retry_max_s: float = Field(default=10.0, gt=0, le=300, description="Largest reopen delay")

    @model_validator(mode="after")
    def _retry_order(self) -> Self:
        if self.retry_min_s > self.retry_max_s:
            raise ValueError("retry_min_s must not exceed retry_max_s")
        return self


class IceServerConfig(StrictModel):
    urls: list[str] = Field(min_length=1, description="stun:host:port or turn:host:port URLs")
    username: str | None = Field(default=None, description="TURN user name")
    credential: SecretStr | None = Field(default=None, description="TURN credential")


class PlaybackConfig(StrictModel):
    output: Literal["device", "file", "none"] = Field(
        default="device",
        description="device: PyAudio output (loudspeakers); file: write a WAV file (rooms "
        "without a sound card, tests); none: do not play",
    )
    device: str | None = Field(
        default=None,
        description="PyAudio output device index or a substring of its name; empty: default",
    )
    path: Path | None = Field(default=None, description="WAV file to write (output: file)")
    file_max_s: float = Field(
        default=600.0,
        ge=10.0,
        le=86_400.0,
        description="output file: the most sound the file holds; when full it starts again "
        "empty (a WAV file cannot wrap around), so a room left playing never fills the disk "
        "(600 s of 48 kHz stereo is 110 MB)",
    )

    @model_validator(mode="after")
    def _output_needs(self) -> Self:
        if self.output == "file" and self.path is None:
            raise ValueError("output 'file' needs 'path' (the WAV file to write)")
        return self


class StreamConfig(StrictModel):
    """Live-lesson settings: WebRTC, the shared encoder, the panel, sinks."""

    ice_servers: list[IceServerConfig] = Field(
        default_factory=list,
        description="STUN/TURN servers; empty means host candidates only (no public STUN)",
    )
    video_codec: Literal["h264", "vp8"] = Field(default="h264", description="Lesson video codec")
    encoder: Literal["libx264", "h264_vaapi", "h264_qsv"] = Field(
        default="libx264", description="H.264 encoder; hardware encoders where the kit has one"
    )
    video_bitrate_kbps: int = Field(
        default=2500, ge=100, le=20000, description="Main layer bitrate"
    )
    low_bitrate_kbps: int = Field(
        default=500, ge=50, le=5000, description="Low layer bitrate for rooms on poor links"
    )
    ice_host_addresses: list[str] = Field(
        default_factory=list,
        description="IP addresses offered as ICE host candidates; empty: every interface "
        "but loopback (the demo and tests use 127.0.0.1)",
    )
    keyframe_interval_s: float = Field(
        default=2.0, ge=0.5, le=10, description="Longest time between keyframes of the lesson video"
    )
    x264_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast"] = Field(
        default="ultrafast", description="libx264 speed/quality trade-off (ultrafast fits 2 cores)"
    )
    media_timeout_s: float = Field(
        default=6.0,
        ge=2,
        le=60,
        description="A receiving room that gets no media for this long reconnects",
    )
    panel_bind: str = Field(default="127.0.0.1", description="Address the teacher panel listens on")

    @field_validator("ice_host_addresses")
    @classmethod
    def _ip_literals(cls, value: list[str]) -> list[str]:
        for address in value:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"must be IP addresses, got {address!r}") from None
        return value

    panel_port: int = Field(
        default=8470, ge=0, le=65535, description="Teacher panel port (0: any free port)"
    )
    panel_enabled: bool = Field(
        default=True, description="Serve the one-button panel, its local API and the kiosk page"
    )
    watch_token_file: Path | None = Field(
        default=None,
        description="File holding the token that authorises the remote 'watch' page and API "
        "calls from other hosts; empty: <state_dir>/panel-token, created on first start",
    )
    low_layer_height: int = Field(
        default=360,
        ge=90,
        le=1080,
        description="Picture height of the low layer sent to rooms on poor links",
    )
    record_dir: Path | None = Field(
        default=None,
        description="Record each lesson here (this room's own copy, one file per lesson); "
        "empty: not recorded",
    )
    playback: PlaybackConfig = Field(
        default_factory=PlaybackConfig,
        description="Where a receiving room plays the lesson's sound",
    )
    link: LinkConfig = Field(default_factory=LinkConfig, description="Media on poor rural links")


class HealthConfig(StrictModel):
    interval_s: float = Field(default=10.0, ge=1, le=3600, description="Telemetry period")
    disk_alert_percent: float = Field(
        default=90.0,
        gt=0,
        le=100,
        description="Disk use of the state directory that raises an alert",
    )
    temperature_alert_c: float = Field(
        default=85.0, ge=40, le=120, description="CPU temperature that raises an alert"
    )
    camera_lost_alert_s: float = Field(
        default=10.0, ge=0, le=3600, description="Camera lost for longer than this raises an alert"
    )
    frozen_alert_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="Camera frozen (identical frames) for longer than this raises an alert",
    )
    black_luma_max: float = Field(
        default=12.0,
        ge=0,
        le=255,
        description="Mean picture luma (0-255) below this counts as a black picture",
    )
    black_alert_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="A black picture for longer than this raises an alert (lens covered)",
    )
    mic_silent_dbfs: float = Field(
        default=-60.0,
        ge=-120,
        le=0,
        description="Microphone level (RMS, dBFS) below this counts as silence",
    )
    mic_silent_alert_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="Silence for longer than this during a live lesson raises an alert",
    )
    temperature_alert_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="Temperature above temperature_alert_c for longer than this raises an alert",
    )
    broker_unreachable_alert_s: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="Broker unreachable for longer than this raises an alert (sent when back)",
    )
    clock_unsynced_alert_s: float = Field(
        default=900.0,
        ge=0,
        le=86400,
        description="Clock not NTP-synchronised for longer than this raises an alert",
    )
    alert_clear_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="An alert clears once its condition has been false for this long (no flapping)",
    )
    store_max_rows: int = Field(
        default=10000,
        ge=10,
        le=1_000_000,
        description=(
            "Messages the on-disk store-and-forward queue keeps during an outage; beyond it "
            "the oldest telemetry is dropped (alerts never are)"
        ),
    )
    home_assistant_discovery: bool = Field(
        default=False, description="Publish Home Assistant MQTT discovery config"
    )
    metrics_enabled: bool = Field(
        default=False,
        description="Serve Prometheus metrics at http://metrics_bind:metrics_port/metrics",
    )
    metrics_port: int = Field(
        default=9464, ge=1024, le=65535, description="Port of the Prometheus /metrics page"
    )
    metrics_bind: str = Field(
        default="127.0.0.1",
        description="Address /metrics listens on; keep loopback unless a firewall protects it "
        "(the page has no authentication)",
    )


class PrivacyConfig(StrictModel):
    retention_days: int = Field(
        default=30, ge=1, le=365, description="Days local sensing records are kept before purge"
    )
    face_recognition: bool = Field(
        default=True,
        description="When false, sensing keeps head count and engagement figures but never "
        "computes or stores a face embedding (and roster enrolment is refused); attendance "
        "needs it",
    )


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe level written"
    )
    format: Literal["text", "json"] = Field(
        default="text", description="json: one object per line, for journald and log shippers"
    )


class SupervisorConfig(StrictModel):
    restart_budget: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Restarts of one service allowed within restart_window_s",
    )
    restart_window_s: float = Field(
        default=60.0, gt=0, le=3600, description="Restart budget window"
    )
    shutdown_timeout_s: float = Field(
        default=4.0,
        gt=0,
        le=8,
        description="Time services get to stop before they are cancelled (systemd kills at 10 s)",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/classroom-agent"), description="Persistent state (store, profiles)"
    )


class HardwareConfig(StrictModel):
    profile: str = Field(
        default="auto",
        description="Hardware kit profile name from firmware-profiles/, or 'auto' to detect it",
    )


UiLanguage = Literal["auto", "zh-CN", "en"]
UI_LANGUAGE_DESCRIPTION = (
    "Language of the local pages (teacher panel, kiosk, watch page, dashboard): 'zh-CN' "
    "or 'en'; 'auto' follows the browser's preferred languages (a Chinese kiosk browser "
    "gets Chinese, anything else English). Texts live in agent/locales/<language>.json"
)


class UiConfig(StrictModel):
    """What the people in the room read: the pages' language."""

    language: UiLanguage = Field(default="auto", description=UI_LANGUAGE_DESCRIPTION)


class AgentConfig(StrictModel):
    identity: IdentityConfig = Field(description="Who this device is")
    hardware: HardwareConfig = Field(default_factory=HardwareConfig, description="Hardware kit")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="Central MQTT broker")
    capture: CaptureConfig = Field(default_factory=CaptureConfig, description="Camera and mic")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="Live lessons")
    sensing: SensingConfig = Field(default_factory=SensingConfig, description="On-device sensing")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Telemetry and alerts")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Data protection")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log output")
    supervisor: SupervisorConfig = Field(
        default_factory=SupervisorConfig, description="Service restarts, shutdown, state"
    )
    ui: UiConfig = Field(default_factory=UiConfig, description="The local pages' language")
    profiles: ProfilesConfig = Field(
        default_factory=ProfilesConfig, description="Trust for config profiles pushed by IT"
    )

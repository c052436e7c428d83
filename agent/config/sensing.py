"""The ``sensing`` section: on-device face detection, attendance and head count.

Off by default in every hardware profile and site file: a school turns it on for a room
on purpose. Every threshold that decides what counts as a face, a match, late or left
early is a field here, with the reason for its default in its description.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from agent.config.base import StrictModel

ExecutionProvider = Literal["auto", "cpu", "openvino"]
PERIOD_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def period_minutes(period: str) -> tuple[int, int]:
    """'08:00-08:45' -> (480, 525): minutes after local midnight, start and end."""
    match = PERIOD_PATTERN.match(period)
    if match is None:
        raise ValueError(f"{period!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return h1 * 60 + m1, h2 * 60 + m2


class SensingConfig(StrictModel):
    """On-device sensing: models, sampling, matching and attendance thresholds."""

    enabled: bool = Field(default=False, description="Run the sensing service (off by default)")
    sample_fps: float = Field(
        default=5.0, gt=0, le=30, description="Frames per second taken from the camera and analysed"
    )
    models_dir: Path | None = Field(
        default=None,
        description="Directory holding models.json and its ONNX files; empty: the models "
        "shipped with the agent (agent/sensing/models/)",
    )
    detector: str = Field(
        default="retinaface-mnet025", description="Face detector, by its name in the registry"
    )
    embedder: str = Field(
        default="dlib-resnet-v1", description="Face embedder, by its name in the registry"
    )
    execution_provider: ExecutionProvider = Field(
        default="auto",
        description="onnxruntime execution provider: 'auto' takes OpenVINO when installed, "
        "else the CPU",
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Threads each model may use (intra-op); 1 leaves the other cores to the "
        "lesson's encoder",
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Scheduling niceness of the sensing thread (Linux, per thread): when the "
        "CPU is short, the lesson's encoder and network run first and sensing samples less",
    )
    detect_width: int = Field(
        default=1280,
        ge=160,
        le=3840,
        description="Frames wider than this are scaled down to it before detection (cost "
        "grows with pixels; faces shrink with it): 1280 keeps 720p as it is, 30 faces at "
        "about 16 fps on one core, every face of 48 px and up found, 32 px about 2 in 3",
    )
    detect_upscale: float = Field(
        default=1.0,
        ge=1.0,
        le=2.0,
        description="Enlarge frames by this before detection to find the back rows' small "
        "faces: 1.5 on 720p finds every 32 px face at about twice the cost, 2.0 half of the "
        "16 px ones at four times",
    )
    min_face_px: int = Field(
        default=16,
        ge=8,
        le=512,
        description="Faces smaller than this (box height in the original frame) are ignored",
    )
    detect_score: float = Field(
        default=0.6,
        gt=0,
        lt=1,
        description="Detector confidence below which a box is not a face (0.6: one false "
        "box in 180 composed faces, against 0.7's missing more small faces)",
    )
    match_distance: float = Field(
        default=0.5,
        gt=0,
        le=2,
        description="Largest descriptor distance (Euclidean, dlib's metric) at which a face "
        "matches an enrolled student; dlib's own 0.6 accepted different children here, "
        "see the README's sensing figures",
    )
    min_embed_px: int = Field(
        default=40,
        ge=16,
        le=512,
        description="Faces smaller than this (eye-to-mouth box height) are counted but not "
        "identified: below it the descriptor is unreliable",
    )
    track_iou: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="Overlap (IoU) with a track's last box at which a face continues that track",
    )
    track_lost_s: float = Field(
        default=3.0,
        gt=0,
        le=120,
        description="A track not seen for this long ends (a face turned away for longer "
        "starts a new track)",
    )
    embed_every_s: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description="A tracked face is embedded again at most this often until its identity "
        "is settled",
    )
    votes_to_settle: int = Field(
        default=3,
        ge=1,
        le=50,
        description="Agreeing votes after which a track's identity is settled (no more embedding)",
    )
    late_after_min: float = Field(
        default=10.0,
        ge=0,
        le=240,
        description="A student first seen this many minutes after the lesson start is late",
    )
    left_early_min: float = Field(
        default=10.0,
        ge=1,
        le=240,
        description="A student not seen during the lesson's last this many minutes left early",
    )
    head_count_window_s: float = Field(
        default=10.0,
        ge=1,
        le=600,
        description="Head count = the most faces seen in any frame of this window: it counts "
        "a child who looks down for a few seconds (people facing away for the whole window "
        "are not counted)",
    )
    head_up_max_yaw_deg: float = Field(
        default=35.0,
        ge=5,
        le=90,
        description="Head-up rate: a face counts as turned to the front while it points "
        "within this many degrees left or right of the camera (which hangs by the board)",
    )
    head_up_max_down_deg: float = Field(
        default=20.0,
        ge=0,
        le=90,
        description="Head-up rate: how far below the camera a face may point and still count "
        "as up (raise it for a camera hung high above the board, lower it for one at eye level)",
    )
    head_up_max_up_deg: float = Field(
        default=30.0,
        ge=0,
        le=90,
        description="Head-up rate: how far above the camera a face may point and still count",
    )
    hand_raising: bool = Field(
        default=True,
        description="While sensing is on, also count hands raised (MoveNet body keypoints "
        "on the region around each tracked face; a wrist above the shoulder line or the "
        "eyes for hand_min_s) and publish the count per minute",
    )
    hand_min_s: float = Field(
        default=1.0,
        ge=0.2,
        le=10,
        description="A hand seen up this long without being seen down is one hand raise "
        "(1 s: longer than an arm swinging past the head, shorter than a pupil waiting to "
        "be called on); the same pupil counts again only after the hand was seen down",
    )
    hand_regions_per_sample: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Most people whose body keypoints are read per sample (about 10 ms each "
        "on one core): pupils with a hand going up are read every sample, the rest in "
        "turn, so 30 pupils at 5 fps and 4 regions are each looked at every 1.5 s",
    )
    raise_room_hand: bool = Field(
        default=False,
        description="Receiving rooms: a hand raise detected during a live lesson raises "
        "the room's hand on the main teacher's panel (as the room's own panel button "
        "does); the teacher lowers it there",
    )
    periods: list[str] = Field(
        default_factory=list,
        description="Local-time windows 'HH:MM-HH:MM' (the room's timetable) in which a room "
        "with no live lesson takes attendance as a sensing-only period; empty: attendance "
        "only during live lessons (head count is always reported)",
    )
    talk_analysis: bool = Field(
        default=True,
        description="While sensing is on, also analyse who talks (Silero VAD on the room "
        "microphone, teacher-vs-class rule) and publish the lesson's S-T figures at its "
        "end (Rt, Ch, mode, the T/S samples; never audio)",
    )
    teacher_dbfs: float = Field(
        default=-28.0,
        ge=-80,
        le=0,
        description="Main room: local speech at or above this RMS level (dBFS) is the "
        "teacher near the microphone, below it the class; set it per room from the levels "
        "'classroom-agent sensing talk' prints for a recorded lesson",
    )
    st_interval_s: float = Field(
        default=30.0,
        ge=1,
        le=600,
        description="S-T sampling interval in seconds (30 s is the standard method's)",
    )
    roster_dir: Path | None = Field(
        default=None,
        description="Encrypted roster store (enrolled embeddings); empty: "
        "{supervisor.state_dir}/sensing",
    )
    key_file: Path | None = Field(
        default=None,
        description="The store's 32-byte AES key (a 0600 file); empty: the systemd credential "
        "'sensing-key' ($CREDENTIALS_DIRECTORY/sensing-key), else "
        "{roster_dir}/store.key created on first enrolment",
    )

    @field_validator("periods")
    @classmethod
    def _periods(cls, periods: list[str]) -> list[str]:
        for period in periods:
            try:
                start, end = period_minutes(period)
            except ValueError:
                raise ValueError(
                    f"{period!r}: write a period as HH:MM-HH:MM in local time, e.g. 08:00-08:45"
                ) from None
            if end <= start:
                raise ValueError(f"{period!r}: the end must be after the start (same day)")
        return periods

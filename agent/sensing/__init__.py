"""On-device sensing: face models with provenance, tracking, rosters and attendance.

Only aggregates (counts) ever leave the device; frames, crops, embeddings, boxes and
student ids stay in the room. Off by default (``sensing.enabled``).
"""

from __future__ import annotations

from agent.sensing.attendance import STATUSES, Attendance
from agent.sensing.cli import add_sensing_commands
from agent.sensing.faces import (
    DETECTORS,
    DLIB_CHIP_TEMPLATE,
    EMBEDDERS,
    Detector,
    DlibResnetEmbedder,
    Embedder,
    Embedding,
    Face,
    RetinaFaceDetector,
    make_detector,
    make_embedder,
    register_detector,
    register_embedder,
    similarity_transform,
)
from agent.sensing.models import (
    ModelError,
    ModelInfo,
    choose_providers,
    load_catalogue,
    model_info,
    open_session,
    read_verified,
    shipped_models_dir,
)
from agent.sensing.pipeline import (
    STAGES,
    FaceResult,
    Gallery,
    Match,
    Pipeline,
    StageTimes,
    heads_up,
)
from agent.sensing.report import (
    CORRECTABLE,
    Correctable,
    CorrectionRefused,
    effective_status,
    render_html,
)
from agent.sensing.report import (
    CSS as REPORT_CSS,
)
from agent.sensing.report_cli import add_report_parser
from agent.sensing.reports import LessonReports, ReportNotFound
from agent.sensing.roster import (
    Enrolled,
    RosterError,
    RosterStore,
    is_signed,
    open_store,
    read_roster,
    read_signed_roster,
)
from agent.sensing.service import SensingService, announce_correction, sensing_service
from agent.sensing.talk import write_wav
from agent.sensing.track import UNKNOWN, Track, Tracker, iou

__all__ = [
    "CORRECTABLE",
    "DETECTORS",
    "DLIB_CHIP_TEMPLATE",
    "EMBEDDERS",
    "REPORT_CSS",
    "STAGES",
    "STATUSES",
    "UNKNOWN",
    "Attendance",
    "Correctable",
    "CorrectionRefused",
    "Detector",
    "DlibResnetEmbedder",
    "Embedder",
    "Embedding",
    "Enrolled",
    "Face",
    "FaceResult",
    "Gallery",
    "LessonReports",
    "Match",
    "ModelError",
    "ModelInfo",
    "Pipeline",
    "ReportNotFound",
    "RetinaFaceDetector",
    "RosterError",
    "RosterStore",
    "SensingService",
    "StageTimes",
    "Track",
    "Tracker",
    "add_report_parser",
    "add_sensing_commands",
    "announce_correction",
    "choose_providers",
    "effective_status",
    "heads_up",
    "iou",
    "is_signed",
    "load_catalogue",
    "make_detector",
    "make_embedder",
    "model_info",
    "open_session",
    "open_store",
    "read_roster",
    "read_signed_roster",
    "read_verified",
    "register_detector",
    "register_embedder",
    "render_html",
    "sensing_service",
    "shipped_models_dir",
    "similarity_transform",
    "write_wav",
]

"""The models the sensing service runs: their metadata, digests and onnxruntime sessions.

``models.json`` beside the ONNX files says what each file is (name, version, source,
licence, input, sha256). Loading checks the digest first, so a corrupt or swapped file is
refused with its path named, never half-run. Sessions pick the best execution provider
present (OpenVINO when installed, else the CPU), cap their threads, and onnxruntime's
telemetry is switched off before the first session exists.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CATALOGUE = "models.json"


class ModelError(Exception):
    """A model file is missing, corrupt or not what models.json says; the message says which."""


@dataclass(frozen=True)
class ModelInfo:
    """One model's metadata (from models.json) and where its file is."""

    name: str
    kind: str
    version: str
    file: Path
    sha256: str
    source: str
    licence: str
    input: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "file": self.file.name,
            "sha256": self.sha256,
            "source": self.source,
            "licence": self.licence,
            "input": self.input,
        }


def shipped_models_dir() -> Path:
    """The models shipped inside the package (works from a checkout and from a wheel)."""
    return Path(str(resources.files("agent.sensing") / "models"))


def load_catalogue(models_dir: Path | None = None) -> dict[str, ModelInfo]:
    """Every model described in ``models_dir/models.json``, by name."""
    folder = models_dir if models_dir is not None else shipped_models_dir()
    path = folder / CATALOGUE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = raw["models"]
        return {
            e["name"]: ModelInfo(
                name=e["name"],
                kind=e["kind"],
                version=e["version"],
                file=folder / e["file"],
                sha256=e["sha256"],
                source=e["source"],
                licence=e["licence"],
                input=e["input"],
            )
            for e in entries
        }
    except FileNotFoundError:
        raise ModelError(f"{path}: model catalogue missing (sensing.models_dir)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable model catalogue ({exc})") from None


def model_info(name: str, models_dir: Path | None = None) -> ModelInfo:
    catalogue = load_catalogue(models_dir)
    if name not in catalogue:
        known = ", ".join(sorted(catalogue)) or "none"
        raise ModelError(f"model {name!r} is not in {CATALOGUE} (known: {known})")
    return catalogue[name]


def read_verified(info: ModelInfo) -> bytes:
    """The model's bytes, after checking them against the digest in models.json."""
    try:
        data = info.file.read_bytes()
    except OSError as exc:
        raise ModelError(f"{info.file}: cannot read model {info.name} ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ModelError(
            f"{info.file}: sha256 {digest[:12]}... differs from models.json "
            f"({info.sha256[:12]}...): corrupt or replaced; reinstall the agent or rebuild "
            "with tools/build_models.py"
        )
    return data


@functools.cache
def _onnxruntime() -> Any:
    """onnxruntime, imported on first use (only the sensing service pays for it), with its
    telemetry switched off before any session exists."""
    import onnxruntime  # noqa: PLC0415

    onnxruntime.disable_telemetry_events()
    onnxruntime.set_default_logger_severity(3)  # its warnings are not for the journal
    return onnxruntime


def choose_providers(preference: str = "auto") -> list[str]:
    """OpenVINO when asked for or when 'auto' finds it installed; the CPU always last."""
    available = set(_onnxruntime().get_available_providers())
    if preference in ("auto", "openvino") and "OpenVINOExecutionProvider" in available:
        return ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    if preference == "openvino":
        log.warning("OpenVINO execution provider not installed; using the CPU")
    return ["CPUExecutionProvider"]


def open_session(info: ModelInfo, *, threads: int = 1, provider: str = "auto") -> Any:
    """An onnxruntime session for a verified model; its load time goes to the journal."""
    ort = _onnxruntime()
    started = time.perf_counter()
    log.info(
        "loading model %s (%s, %.1f MB)",
        info.name,
        info.version,
        info.file.stat().st_size / 1e6 if info.file.exists() else 0.0,
        extra={"fields": {"model": info.name, "file": str(info.file)}},
    )
    data = read_verified(info)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    providers = choose_providers(provider)
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors on a bad graph
        raise ModelError(f"{info.file}: onnxruntime cannot load model {info.name}: {exc}") from None
    log.info(
        "model %s loaded in %.0f ms on %s",
        info.name,
        (time.perf_counter() - started) * 1000,
        session.get_providers()[0],
        extra={"fields": {"model": info.name, "threads": threads}},
    )
    return session

"""The shipped models: metadata, digests, bad files refused by name, sessions capped."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from agent.sensing import (
    DlibResnetEmbedder,
    ModelError,
    RetinaFaceDetector,
    choose_providers,
    load_catalogue,
    model_info,
    shipped_models_dir,
)

FIELDS = ("name", "kind", "version", "file", "sha256", "source", "licence", "input")


def test_every_shipped_model_has_metadata_a_notice_and_its_digest() -> None:
    folder = shipped_models_dir()
    catalogue = load_catalogue()
    assert {"retinaface-mnet025", "dlib-resnet-v1"} <= set(catalogue)
    notice = (folder / "NOTICE.md").read_text(encoding="utf-8")
    for info in catalogue.values():
        for key, value in info.to_dict().items():
            assert value, f"{info.name}: {key} empty"
        assert hashlib.sha256(info.file.read_bytes()).hexdigest() == info.sha256
        assert info.file.name in notice
    # Nothing else ships beside them (no expression/age/gender model sneaks in).
    shipped = {p.name for p in folder.iterdir()}
    assert shipped == {"models.json", "NOTICE.md"} | {i.file.name for i in catalogue.values()}
    for banned in ("expression", "emotion", "age", "gender"):
        assert not any(banned in name for name in shipped)


def _copy_models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(shipped_models_dir(), folder)
    return folder


def test_a_corrupt_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _copy_models(tmp_path)
    target = folder / "retinaface-mnet025.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"retinaface-mnet025\.onnx: sha256 .* corrupt"):
        RetinaFaceDetector(model_info("retinaface-mnet025", folder))


def test_a_missing_model_or_catalogue_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _copy_models(tmp_path)
    (folder / "dlib-resnet-v1.onnx").unlink()
    with pytest.raises(ModelError, match=r"dlib-resnet-v1\.onnx: cannot read"):
        DlibResnetEmbedder(model_info("dlib-resnet-v1", folder))
    with pytest.raises(ModelError, match=r"not in models\.json"):
        model_info("face-expression", folder)
    (folder / "models.json").unlink()
    with pytest.raises(ModelError, match=r"models\.json: model catalogue missing"):
        load_catalogue(folder)


def test_a_valid_digest_on_a_broken_graph_is_still_a_clear_error(tmp_path: Path) -> None:
    folder = _copy_models(tmp_path)
    (folder / "retinaface-mnet025.onnx").write_bytes(b"not an onnx graph")
    catalogue = json.loads((folder / "models.json").read_text())
    for entry in catalogue["models"]:
        if entry["name"] == "retinaface-mnet025":
            entry["sha256"] = hashlib.sha256(b"not an onnx graph").hexdigest()
    (folder / "models.json").write_text(json.dumps(catalogue))
    with pytest.raises(ModelError, match="onnxruntime cannot load model retinaface-mnet025"):
        RetinaFaceDetector(model_info("retinaface-mnet025", folder))


def test_sessions_take_the_thread_cap_and_log_their_load_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sensing")
    detector = RetinaFaceDetector(model_info("retinaface-mnet025"), threads=2)
    options = detector.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("loading model retinaface-mnet025") for m in messages)
    assert any("model retinaface-mnet025 loaded in" in m for m in messages)
    # No OpenVINO here: the CPU, and asking for OpenVINO falls back with a warning.
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    assert choose_providers("openvino") == ["CPUExecutionProvider"]
    assert detector.session.get_providers()[0] == "CPUExecutionProvider"

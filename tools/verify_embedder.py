"""Prove the ONNX embedder and the alignment against the real dlib, and fit the template.

A developer's tool (dlib is never used at run time). Needs PyPI ``dlib-bin`` (dlib's
Python module) and ``face-recognition-models==0.3.0`` (dlib's 5-point shape predictor and
ResNet ``.dat`` files, CC0). For every face that dlib's HOG detector and our RetinaFace
both find in the test photos:

1. dlib's reference descriptor: 5-point shape -> ``get_face_chip(150, 0.25)`` -> dlib.
2. *network*: our ONNX graph on dlib's own chip (the weights and graph alone).
3. *pipeline*: our ONNX graph on our chip, aligned from RetinaFace's landmarks to the
   template (the whole of what the agent runs).

``--fit`` prints the template (RetinaFace's landmarks mapped through each face's dlib
chip transform, averaged) to paste into ``agent/sensing/faces.py``. The figures printed
are the Euclidean distances to dlib's descriptor (dlib's own same-person threshold: 0.6).

    .venv/bin/python tools/verify_embedder.py tests/data/faces/*.jpg [--fit]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.sensing import (
    DlibResnetEmbedder,
    RetinaFaceDetector,
    model_info,
)


def dlib_models() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install face-recognition-models==0.3.0 (dlib's .dat files)")
    return Path(spec.origin).parent / "models"


def chip_mapping(details: object) -> np.ndarray:
    """dlib's get_mapping_to_chip: image -> chip affine for a chip_details."""
    rect, angle = details.rect, details.angle  # type: ignore[attr-defined]
    cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
    c, s = math.cos(angle), math.sin(angle)

    def rot(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return cx + c * dx - s * dy, cy + s * dx + c * dy

    src = np.float32(
        [
            rot(rect.left(), rect.top()),
            rot(rect.right(), rect.top()),
            rot(rect.right(), rect.bottom()),
        ]
    )
    cols, rows = details.cols, details.rows  # type: ignore[attr-defined]
    dst = np.float32([[0, 0], [cols - 1, 0], [cols - 1, rows - 1]])
    return cv2.getAffineTransform(src, dst)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def main() -> int:
    import dlib

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--fit", action="store_true", help="print a fitted template")
    args = parser.parse_args()
    folder = dlib_models()
    hog = dlib.get_frontal_face_detector()
    shape5 = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
    resnet = dlib.face_recognition_model_v1(
        str(folder / "dlib_face_recognition_resnet_model_v1.dat")
    )
    detector = RetinaFaceDetector(model_info("retinaface-mnet025"), detect_width=None)
    embedder = DlibResnetEmbedder(model_info("dlib-resnet-v1"))

    mapped, network, pipeline, faces = [], [], [], []
    for path in args.images:
        bgr = cv2.imread(str(path))
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        ours = detector.detect(bgr)
        for rect in hog(rgb, 1):
            box = (rect.left(), rect.top(), rect.width(), rect.height())
            best = max(ours, key=lambda f: iou(box, f.box), default=None)
            if best is None or iou(box, best.box) < 0.3:
                continue
            shape = shape5(rgb, rect)
            reference = np.array(resnet.compute_face_descriptor(rgb, shape))
            dlib_chip = dlib.get_face_chip(rgb, shape, 150, 0.25)
            on_dlib_chip = embedder.embed([np.ascontiguousarray(dlib_chip)])[0]
            on_our_chip = embedder.embed([embedder.align(bgr, best)])[0]
            network.append(float(np.linalg.norm(reference - on_dlib_chip)))
            pipeline.append(float(np.linalg.norm(reference - on_our_chip)))
            matrix = chip_mapping(dlib.get_face_chip_details(shape, 150, 0.25))
            points = np.hstack([best.landmarks, np.ones((5, 1), np.float32)])
            mapped.append(points @ matrix.T)
            faces.append((bgr, best, reference))
    if not mapped:
        raise SystemExit("no face found by both detectors")
    net, pipe = np.array(network), np.array(pipeline)
    print(f"faces compared: {len(net)} (in {len(args.images)} images)")
    print(
        f"network (ONNX on dlib's chip) vs dlib: mean {net.mean():.4f} median "
        f"{np.median(net):.4f} max {net.max():.4f}"
    )
    print(
        f"pipeline (RetinaFace + template + ONNX) vs dlib: mean {pipe.mean():.4f} median "
        f"{np.median(pipe):.4f} p90 {np.percentile(pipe, 90):.4f} max {pipe.max():.4f}"
    )
    # Leave-one-out: each face aligned to a template fitted without it (is the shipped
    # template's figure an in-sample one?).
    from agent.sensing.faces import similarity_transform, warp_chip

    left_out = []
    for i, (bgr, face, reference) in enumerate(faces):
        template = np.mean([m for j, m in enumerate(mapped) if j != i], axis=0)
        chip = warp_chip(bgr, similarity_transform(face.landmarks, template), 150)
        got = embedder.embed([np.ascontiguousarray(chip[:, :, ::-1])])[0]
        left_out.append(float(np.linalg.norm(reference - got)))
    loo = np.array(left_out)
    print(
        f"pipeline, template fitted without the face (leave-one-out): mean {loo.mean():.4f} "
        f"max {loo.max():.4f}"
    )
    if args.fit:
        template = np.mean(mapped, axis=0)
        spread = np.std(mapped, axis=0)
        print("template (x, y) and spread (px) in the 150x150 chip:")
        for (x, y), (sx, sy) in zip(template, spread, strict=True):
            print(f"        [{x:.2f}, {y:.2f}],  # +/- {sx:.1f}, {sy:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

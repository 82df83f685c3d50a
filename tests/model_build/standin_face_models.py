"""Stand-in ONNX files for FaceFusion's face models: their tensors exactly, tiny random weights.

Built from issue 12's contract text alone, never from the importer's contract module, so a contract
that drifts from the issue is caught by these files instead of agreeing with itself. Where the issue
is silent the stand-ins choose (and say so): output names, detector output names, batch axes.

- inswapper_128 (and _fp16): inputs "target" (1, 3, 128, 128) RGB in 0..1 and "source" (1, 512);
  output "output" (1, 3, 128, 128) in 0..1. Fixed at batch 1 the way released files are: the source's
  style vector goes through a Reshape whose shape constant is (1, 3, 1, 1), so a batch of two cannot
  run until the graph is rewritten. The last initializer is "emap" (512, 512), unused by the graph as
  in the release (the source arrives projected). The fp16 variant stores FP16 weights, emap included,
  behind float32 inputs and output joined by Cast nodes.
- hyperswap_1a/1b/1c_256: "target" (N, 3, 256, 256), "source" (N, 512); output "output"
  (N, 3, 256, 256) in -1..1.
- arcface_w600k_r50: "input" (N, 3, 112, 112); output "embedding" (N, 512).
- yoloface_8n: "input" (N, 3, 640, 640); output (N, 20, 8400): per candidate 4 box values, a score and
  five landmarks of (x, y, confidence), for the 80², 40² and 20² cells of strides 8, 16 and 32.
- scrfd_2.5g and retinaface_10g: "input" (1, 3, height, width); nine outputs without a batch axis: the
  scores (rows, 1) of strides 8, 16 and 32, then their boxes (rows, 4), then their landmarks (rows, 10),
  with rows = cells of the stride x 2 anchors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.common.media_paths import write_file

OPSET = 17
# The IR version of opset 17 (onnx 1.12): old enough for the onnxruntime inside Triton images.
IR_VERSION = 8
EMBEDDING = 512
STRIDES = (8, 16, 32)
ANCHORS = 2
YOLO_SIDE = 640
# The row: 4 box values, 1 score, and 5 landmarks of (x, y, confidence).
YOLO_ROW = 4 + 1 + 5 * 3
SEED = 0
# The name of the dynamic batch axis, where a stand-in has one.
BATCH = "N"


def _initializer(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, name)


def _int64s(name: str, values: tuple[int, ...]) -> TensorProto:
    return _initializer(name, np.array(values, dtype=np.int64))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, model.SerializeToString())


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="swapline-standin")


def inswapper_standin(path: Path, fp16: bool = False) -> Path:
    """inswapper_128 (fp16=False) or inswapper_128_fp16 at `path`; see the module's docstring."""
    rng = np.random.default_rng(SEED)
    weight_type = np.float16 if fp16 else np.float32
    nodes = []
    target, source = "target", "source"
    if fp16:
        nodes += [
            helper.make_node("Cast", ["target"], ["target_fp16"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["source"], ["source_fp16"], to=TensorProto.FLOAT16),
        ]
        target, source = "target_fp16", "source_fp16"
    result = "swapped_fp16" if fp16 else "output"
    nodes += [
        helper.make_node("Conv", [target, "mix_weight", "mix_bias"], ["mixed"]),
        helper.make_node("MatMul", [source, "style_weight"], ["style"]),
        # The batch of 1 hard-coded in a shape constant, as in the released graph.
        helper.make_node("Reshape", ["style", "style_shape"], ["style_map"]),
        helper.make_node("Add", ["mixed", "style_map"], ["styled"]),
        helper.make_node("Sigmoid", ["styled"], [result]),
    ]
    if fp16:
        nodes.append(helper.make_node("Cast", [result], ["output"], to=TensorProto.FLOAT))
    initializers = [
        _initializer("mix_weight", rng.normal(0, 0.5, (3, 3, 1, 1)).astype(weight_type)),
        _initializer("mix_bias", rng.normal(0, 0.1, 3).astype(weight_type)),
        _initializer("style_weight", rng.normal(0, 1, (EMBEDDING, 3)).astype(weight_type)),
        _int64s("style_shape", (1, 3, 1, 1)),
        _initializer("emap", rng.normal(0, 1 / EMBEDDING**0.5, (EMBEDDING, EMBEDDING)).astype(weight_type)),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_128_standin",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, EMBEDDING]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializers,
    )
    return _save(_model(graph), path)


def hyperswap_standin(path: Path) -> Path:
    """A hyperswap_1?_256 at `path` with a dynamic batch; the output is a crop in -1..1."""
    rng = np.random.default_rng(SEED + 1)
    crop: list[str | int] = [BATCH, 3, 256, 256]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["target", "mix_weight", "mix_bias"], ["mixed"]),
            helper.make_node("MatMul", ["source", "style_weight"], ["style"]),
            helper.make_node("Unsqueeze", ["style", "style_axes"], ["style_map"]),
            helper.make_node("Add", ["mixed", "style_map"], ["styled"]),
            helper.make_node("Tanh", ["styled"], ["output"]),
        ],
        "hyperswap_256_standin",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, crop),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [BATCH, EMBEDDING]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, crop)],
        [
            _initializer("mix_weight", rng.normal(0, 0.5, (3, 3, 1, 1)).astype(np.float32)),
            _initializer("mix_bias", rng.normal(0, 0.1, 3).astype(np.float32)),
            _initializer("style_weight", rng.normal(0, 1, (EMBEDDING, 3)).astype(np.float32)),
            _int64s("style_axes", (2, 3)),
        ],
    )
    return _save(_model(graph), path)


def arcface_standin(path: Path) -> Path:
    """arcface_w600k_r50 at `path`: 14-pixel cell means of the crop, projected to 512 values."""
    rng = np.random.default_rng(SEED + 2)
    cells = 3 * (112 // 14) ** 2
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["input"], ["cells"], kernel_shape=[14, 14], strides=[14, 14]),
            helper.make_node("Flatten", ["cells"], ["features"]),
            helper.make_node("MatMul", ["features", "projection"], ["embedding"]),
        ],
        "arcface_w600k_r50_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [BATCH, EMBEDDING])],
        [_initializer("projection", rng.normal(0, 1 / cells**0.5, (cells, EMBEDDING)).astype(np.float32))],
    )
    return _save(_model(graph), path)


def yoloface_standin(path: Path) -> Path:
    """yoloface_8n at `path`: a 1x1 convolution to the 20 row values on the cells of each stride, the
    cells of strides 8, 16 and 32 concatenated as YOLOv8's head lays them out."""
    rng = np.random.default_rng(SEED + 3)
    nodes = [helper.make_node("Conv", ["input", "head_weight", "head_bias"], ["head"])]
    per_stride = []
    for stride in STRIDES:
        pooled, rows = f"head_{stride}", f"rows_{stride}"
        nodes += [
            helper.make_node(
                "AveragePool", ["head"], [pooled], kernel_shape=[stride, stride], strides=[stride, stride]
            ),
            helper.make_node("Reshape", [pooled, "rows_shape"], [rows]),
        ]
        per_stride.append(rows)
    nodes.append(helper.make_node("Concat", per_stride, ["output0"], axis=2))
    candidates = sum((YOLO_SIDE // stride) ** 2 for stride in STRIDES)
    graph = helper.make_graph(
        nodes,
        "yoloface_8n_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, 3, YOLO_SIDE, YOLO_SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [BATCH, YOLO_ROW, candidates])],
        [
            _initializer("head_weight", rng.normal(0, 1, (YOLO_ROW, 3, 1, 1)).astype(np.float32)),
            _initializer("head_bias", rng.normal(0, 0.1, YOLO_ROW).astype(np.float32)),
            # 0 keeps the batch as it is; -1 takes the cells.
            _int64s("rows_shape", (0, YOLO_ROW, -1)),
        ],
    )
    return _save(_model(graph), path)


def anchor_stride_standin(path: Path) -> Path:
    """scrfd_2.5g or retinaface_10g at `path`: for each stride, 1x1 convolutions of the stride's cell
    means give each cell's two anchors their score, box and landmark values, one row per anchor."""
    rng = np.random.default_rng(SEED + 4)
    nodes = []
    initializers = [_int64s(f"rows_of_{values}", (-1, values)) for values in (1, 4, 10)]
    outputs: dict[str, list[onnx.ValueInfoProto]] = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        cells = f"cells_{stride}"
        nodes.append(
            helper.make_node("AveragePool", ["input"], [cells], kernel_shape=[stride, stride], strides=[stride, stride])
        )
        for kind, values in (("score", 1), ("bbox", 4), ("kps", 10)):
            name = f"{kind}_{stride}"
            initializers.append(
                _initializer(f"{name}_weight", rng.normal(0, 1, (ANCHORS * values, 3, 1, 1)).astype(np.float32))
            )
            nodes += [
                helper.make_node("Conv", [cells, f"{name}_weight"], [f"{name}_map"]),
                helper.make_node("Transpose", [f"{name}_map"], [f"{name}_last"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"{name}_last", f"rows_of_{values}"], [f"{name}_rows"]),
            ]
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [f"{name}_rows"], [name]))
            else:
                nodes.append(helper.make_node("Identity", [f"{name}_rows"], [name]))
            outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"rows_{stride}", values]))
    graph = helper.make_graph(
        nodes,
        "anchor_stride_detector_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [*outputs["score"], *outputs["bbox"], *outputs["kps"]],
        initializers,
    )
    return _save(_model(graph), path)


STANDIN_BUILDERS: Mapping[str, Callable[[Path], Path]] = MappingProxyType(
    {
        "inswapper_128": inswapper_standin,
        "inswapper_128_fp16": lambda path: inswapper_standin(path, fp16=True),
        "hyperswap_1a_256": hyperswap_standin,
        "hyperswap_1b_256": hyperswap_standin,
        "hyperswap_1c_256": hyperswap_standin,
        "arcface_w600k_r50": arcface_standin,
        "yoloface_8n": yoloface_standin,
        "scrfd_2.5g": anchor_stride_standin,
        "retinaface_10g": anchor_stride_standin,
    }
)


def write_standin(stem: str, directory: Path) -> Path:
    """The stand-in for FaceFusion's `stem`, written as `directory/<stem>.onnx`."""
    return STANDIN_BUILDERS[stem](directory / f"{stem}.onnx")

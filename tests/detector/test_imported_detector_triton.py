"""Imported detectors through the real tritonserver: stand-ins whose answers are planted, installed by
`swapline models import`'s import_model_set, served by the embedded Triton and asked by the detector
service's ChosenDetector.

Each stand-in is written here from issue 12's contract text (not from the importer's contracts): an
input "input" (N, 3, 640, 640) or (1, 3, height, width), and outputs that ignore the image (it is only
multiplied by zero so that the outputs follow its batch) and hold the faces planted below, in canvas
pixels. The frames are 1920x1080, fitted onto the 640 canvas at a third of their size, so every
planted coordinate comes back three times larger. Planted values are exact in FP16, since the served
build is the FP16 one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.common.errors import FailedPrecondition
from services.common.face_types import DetectedFace
from services.common.triton_client import TritonClient
from services.detector.detector_choice import ChosenDetector, TritonReadinessProbe
from services.model_build.model_import import import_model_set
from services.triton.server_process import EmbeddedTriton

TIMEOUT_SECONDS = 60.0
# The YOLOFace row: 4 box values, 1 score, 5 landmarks of (x, y, confidence); the candidates of
# strides 8, 16 and 32 on the 640 canvas.
YOLO_ROW = 20
YOLO_CANDIDATES = 80 * 80 + 40 * 40 + 20 * 20
# SCRFD and RetinaFace: two anchors per location of each stride.
STRIDE_ROWS = {8: 80 * 80 * 2, 16: 40 * 40 * 2, 32: 20 * 20 * 2}
FRAME_WIDTH, FRAME_HEIGHT = 1920, 1080
SCALE = 3.0
OPSET = 17


def _zero_of_input(rank: int) -> list[onnx.NodeProto]:
    """Nodes making "zero": the input's mean times 0, shaped (N, 1, 1) or a scalar (rank 0)."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["mean", "nought"], ["zero_4d"]),
    ]
    if rank == 3:
        return [*nodes, helper.make_node("Reshape", ["zero_4d", "batch_shape"], ["zero"])]
    return [*nodes, helper.make_node("ReduceMean", ["zero_4d"], ["zero"], keepdims=0)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def planted_yolo(path: Path, columns: np.ndarray) -> Path:
    """A yoloface_8n whose (N, 20, 8400) answer is `columns` for every frame."""
    graph = helper.make_graph(
        [*_zero_of_input(3), helper.make_node("Add", ["zero", "planted"], ["boxes_scores_points"])],
        "planted_yoloface",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 640, 640])],
        [helper.make_tensor_value_info("boxes_scores_points", TensorProto.FLOAT, ["N", YOLO_ROW, YOLO_CANDIDATES])],
        [
            numpy_helper.from_array(np.array(0, np.float32), "nought"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "batch_shape"),
            numpy_helper.from_array(columns[None].astype(np.float32), "planted"),
        ],
    )
    return _save(graph, path)


def planted_anchor_strides(path: Path, outputs: list[np.ndarray]) -> Path:
    """An scrfd_2.5g or retinaface_10g whose nine answers are `outputs`, named out of alphabetical order so
    that only their position tells them apart."""
    names = [f"{'zyxwvutsr'[index]}_{index}" for index in range(9)]
    graph = helper.make_graph(
        [
            *_zero_of_input(0),
            *(helper.make_node("Add", ["zero", f"planted_{index}"], [name]) for index, name in enumerate(names)),
        ],
        "planted_anchor_strides",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, list(output.shape))
            for name, output in zip(names, outputs, strict=True)
        ],
        [
            numpy_helper.from_array(np.array(0, np.float32), "nought"),
            *(
                numpy_helper.from_array(output.astype(np.float32), f"planted_{index}")
                for index, output in enumerate(outputs)
            ),
        ],
    )
    return _save(graph, path)


# Two faces planted in YOLOFace's columns, a weaker duplicate of the first (overlapping it far more
# than NMS allows) and a face scoring below FaceFusion's 0.5. Canvas pixels: centre, size, score, points.
YOLO_FACES = [
    (200.0, 150.0, 80.0, 100.0, 0.875, [(184, 130), (216, 130), (200, 150), (188, 175), (212, 175)]),
    (400.0, 250.0, 40.0, 48.0, 0.75, [(392, 242), (408, 242), (400, 250), (394, 262), (406, 262)]),
]
YOLO_DUPLICATE = (202.0, 152.0, 80.0, 100.0, 0.625, [(184, 130)] * 5)
YOLO_WEAK = (500.0, 100.0, 60.0, 60.0, 0.25, [(500, 100)] * 5)


def yolo_columns() -> np.ndarray:
    columns = np.zeros((YOLO_ROW, YOLO_CANDIDATES), np.float32)
    for column, (cx, cy, width, height, score, points) in zip(
        (17, 4000, 8100, 8399), [*YOLO_FACES, YOLO_DUPLICATE, YOLO_WEAK], strict=True
    ):
        columns[:5, column] = (cx, cy, width, height, score)
        for point, (x, y) in enumerate(points):
            columns[5 + 3 * point : 8 + 3 * point, column] = (x, y, 0.5)
    return columns


def yolo_expected() -> list[tuple[tuple[float, ...], float, list[list[float]]]]:
    return [
        (
            tuple(SCALE * v for v in (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)),
            score,
            [[SCALE * x, SCALE * y] for x, y in points],
        )
        for cx, cy, width, height, score, points in YOLO_FACES
    ]


@dataclass(frozen=True)
class AnchorFace:
    """A face planted at one anchor: its cell, the distances to the box's left, top, right and bottom edges
    and the five (x, y) point offsets, all in units of the stride."""

    stride: int
    row: int
    column: int
    anchor: int
    score: float
    edges: tuple[float, float, float, float]
    offsets: tuple[tuple[float, float], ...]


ANCHOR_FACES = [
    AnchorFace(16, 10, 20, 1, 0.9375, (2.5, 3.0, 2.5, 3.5), ((-1, -1), (1, -1), (0, 0.5), (-0.75, 1.5), (0.75, 1.5))),
    AnchorFace(8, 30, 10, 0, 0.8125, (3.0, 4.0, 3.0, 4.0), ((-1, -1), (1, -1), (0, 0), (-1, 2), (1, 2))),
]


def anchor_outputs() -> list[np.ndarray]:
    scores = {stride: np.zeros((rows, 1), np.float32) for stride, rows in STRIDE_ROWS.items()}
    boxes = {stride: np.zeros((rows, 4), np.float32) for stride, rows in STRIDE_ROWS.items()}
    points = {stride: np.zeros((rows, 10), np.float32) for stride, rows in STRIDE_ROWS.items()}
    for face in ANCHOR_FACES:
        index = (face.row * (640 // face.stride) + face.column) * 2 + face.anchor
        scores[face.stride][index] = face.score
        boxes[face.stride][index] = face.edges
        points[face.stride][index] = np.array(face.offsets, np.float32).ravel()
    strides = (8, 16, 32)
    return [*(scores[s] for s in strides), *(boxes[s] for s in strides), *(points[s] for s in strides)]


def anchor_expected() -> list[tuple[tuple[float, ...], float, list[list[float]]]]:
    expected = []
    for face in ANCHOR_FACES:
        stride, (left, top, right, bottom) = face.stride, face.edges
        x, y = face.column * stride, face.row * stride
        box = (x - left * stride, y - top * stride, x + right * stride, y + bottom * stride)
        points = [[SCALE * (x + dx * stride), SCALE * (y + dy * stride)] for dx, dy in face.offsets]
        expected.append((tuple(SCALE * v for v in box), face.score, points))
    return expected


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    folder = tmp_path_factory.mktemp("assets-models")
    planted_yolo(folder / "yoloface_8n.onnx", yolo_columns())
    planted_anchor_strides(folder / "scrfd_2.5g.onnx", anchor_outputs())
    poisoned = anchor_outputs()
    poisoned[4][7, 2] = np.nan
    planted_anchor_strides(folder / "retinaface_10g.onnx", poisoned)
    repository = tmp_path_factory.mktemp("models") / "triton_models"
    repository.mkdir()
    import_model_set(folder, repository, "planted")
    models = ["yoloface_8n", "scrfd_2.5g", "retinaface_10g", "retinaface_10g_fp32"]
    work = tmp_path_factory.mktemp("triton")
    with EmbeddedTriton(repository, work, models=models, device="cpu", startup_timeout=90) as triton:
        yield triton


def detect(triton: EmbeddedTriton, model: str, frames: np.ndarray) -> list[list[DetectedFace]]:
    async def run() -> list[list[DetectedFace]]:
        client = TritonClient(triton.grpc_url, TIMEOUT_SECONDS)
        try:
            probe = TritonReadinessProbe(triton.grpc_url, TIMEOUT_SECONDS)
            detector = await ChosenDetector(client, probe, "auto").for_model(model)
            return await detector.detect(frames)
        finally:
            await client.close()

    return asyncio.run(run())


def described(faces: list[DetectedFace]) -> list[tuple[tuple[float, ...], float, list[list[float]]]]:
    """Faces rounded to what FP16 keeps of the planted values (they were chosen exact in FP16)."""
    return [
        (tuple(round(v, 3) for v in face.box), round(face.score, 4), np.round(face.landmarks, 3).tolist())
        for face in faces
    ]


def frames(count: int) -> np.ndarray:
    return np.zeros((count, FRAME_HEIGHT, FRAME_WIDTH, 3), np.uint8)


def test_yoloface_finds_the_planted_faces_in_frame_pixels(served: EmbeddedTriton) -> None:
    assert [described(faces) for faces in detect(served, "yoloface_8n", frames(2))] == [yolo_expected()] * 2


def test_scrfd_finds_the_planted_faces_in_frame_pixels(served: EmbeddedTriton) -> None:
    assert [described(faces) for faces in detect(served, "scrfd_2.5g", frames(2))] == [anchor_expected()] * 2


def test_a_non_finite_answer_from_the_fp32_twin_too_fails_naming_both(served: EmbeddedTriton) -> None:
    expected = r"model retinaface_10g_fp32 returned NaN or infinite values, as its FP16 build retinaface_10g did"
    with pytest.raises(FailedPrecondition, match=expected):
        detect(served, "retinaface_10g", frames(1))

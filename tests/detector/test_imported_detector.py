"""The imported detectors' pure pre- and post-processing, their output checks, and how a request's model
picks the detector. Expected values are worked out here from FaceFusion's rules (face_detector.py,
face_helper.py) and issue 12's contract text."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.face_detector_models import DETECTOR_MODELS
from services.common.face_model_catalog import DETECTOR_NAMES
from services.common.frames.frame_codec import pack_frames
from services.common.frames.frame_streams import parse_detect_request
from services.detector.detector_choice import ChosenDetector
from services.detector.face_detector import CASCADE_MODEL, PNET_MODEL, FaceDetector
from services.detector.imported_detector import (
    REQUEST_FALLBACKS,
    Candidates,
    FallbackTally,
    Fitted,
    ImportedFaceDetector,
    decode_anchor_strides,
    decode_yolo_rows,
    distances_to_boxes,
    distances_to_landmarks,
    fitted_size,
    frame_faces,
    letterbox,
    static_anchors,
    to_frame,
)
from services.detector.servicer import DetectorServicer
from swapline.detector.v1 import detector_pb2

YOLO = DETECTOR_MODELS["yoloface_8n"]
SCRFD = DETECTOR_MODELS["scrfd_2.5g"]
FRAME = np.zeros((1, 48, 64, 3), np.uint8)


def test_anchors_run_row_by_row_x_fastest_two_per_cell() -> None:
    assert static_anchors(8)[:6].tolist() == [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0]]


def test_an_anchor_sits_at_its_cells_top_left_corner() -> None:
    assert static_anchors(16)[(10 * 40 + 20) * 2 + 1].tolist() == [320, 160]


def test_anchors_cover_each_strides_cells_twice() -> None:
    assert [len(static_anchors(stride)) for stride in (8, 16, 32)] == [12800, 3200, 800]


def test_distances_become_box_edges_around_the_anchor() -> None:
    assert distances_to_boxes(np.array([[320.0, 160.0]]), np.array([[40.0, 48.0, 40.0, 56.0]])).tolist() == [
        [280, 112, 360, 216]
    ]


def test_distances_become_points_beside_the_anchor() -> None:
    offsets = np.array([[-16.0, -16.0, 16.0, -16.0, 0.0, 8.0, -12.0, 24.0, 12.0, 24.0]])
    assert distances_to_landmarks(np.array([[320.0, 160.0]]), offsets).tolist() == [
        [[304, 144], [336, 144], [320, 168], [308, 184], [332, 184]]
    ]


def test_a_large_frame_shrinks_to_fit_the_canvas() -> None:
    assert fitted_size(1920, 1080) == Fitted(640, 360, 3.0, 3.0)


def test_a_shrunk_side_is_truncated_and_its_ratio_follows() -> None:
    assert fitted_size(1000, 701) == Fitted(640, 448, 1000 / 640, 701 / 448)


def test_a_small_frame_is_never_enlarged() -> None:
    assert fitted_size(320, 200) == Fitted(320, 200, 1.0, 1.0)


def test_canvas_faces_map_back_by_the_shrinks_ratios() -> None:
    canvas = Candidates(np.array([[10.0, 20.0, 30.0, 40.0]]), np.array([0.9]), np.full((1, 5, 2), 10.0))
    mapped = to_frame(canvas, Fitted(640, 448, 2.0, 1.5))
    assert (mapped.boxes.tolist(), mapped.landmarks[0, 0].tolist()) == ([[20, 30, 60, 60]], [20, 15])


def test_yoloface_takes_bgr_in_unit_range_on_black() -> None:
    frame = np.zeros((2, 4, 3), np.uint8)
    frame[0, 0] = (255, 0, 0)
    image = letterbox(frame, YOLO, canvas=8)
    assert (image.shape, image[:, 0, 0].tolist(), float(image[:, 7, 7].max())) == ((3, 8, 8), [0.0, 0.0, 1.0], 0.0)


def test_scrfd_takes_bgr_in_symmetric_range_padded_with_black() -> None:
    frame = np.full((2, 4, 3), 255, np.uint8)
    image = letterbox(frame, SCRFD, canvas=8)
    assert (float(image[0, 0, 0]), float(image[2, 7, 7])) == (127.5 / 128, -127.5 / 128)


def test_a_yolo_column_becomes_a_box_score_and_points() -> None:
    column = np.array([100, 50, 20, 40, 0.75, 91, 41, 0.9, 109, 41, 0.9, 100, 50, 0.9, 93, 60, 0.9, 107, 60, 0.9])
    candidates = decode_yolo_rows(np.stack([column, column * 0.0], axis=1).astype(np.float32), min_score=0.5)
    assert (candidates.boxes.tolist(), candidates.scores.tolist(), candidates.landmarks[0, 4].tolist()) == (
        [[90, 30, 110, 70]],
        [0.75],
        [107, 60],
    )


def test_anchor_stride_rows_below_the_score_are_dropped() -> None:
    rows = {8: 12800, 16: 3200, 32: 800}
    scores = [np.zeros((rows[stride], 1), np.float32) for stride in (8, 16, 32)]
    scores[2][3, 0] = 0.5
    outputs = [*scores, *(np.ones((rows[s], 4), np.float32) for s in (8, 16, 32))]
    outputs += [np.zeros((rows[s], 10), np.float32) for s in (8, 16, 32)]
    # Row 3 of stride 32: the second anchor of cell (0, 1), at x 32: edges one stride away.
    assert decode_anchor_strides(outputs, min_score=0.5).boxes.tolist() == [[0, -32, 64, 32]]


def test_overlapping_faces_keep_the_best_and_small_ones_go() -> None:
    boxes = np.array([[0, 0, 100, 100], [5, 5, 105, 105], [200, 0, 300, 100], [400, 0, 410, 30]], np.float32)
    candidates = Candidates(boxes, np.array([0.6, 0.9, 0.7, 0.95], np.float32), np.zeros((4, 5, 2), np.float32))
    assert [face.box for face in frame_faces(candidates, 1000, 1000, min_face_size=20)] == [
        (5, 5, 105, 105),
        (200, 0, 300, 100),
    ]


class Answers:
    """A ModelRunner answering each request with what the test planted; notes the models asked."""

    def __init__(self, answer: Mapping[str, np.ndarray]) -> None:
        self.answer = dict(answer)
        self.models: list[str] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.models.append(model)
        return self.answer


def detect_with(answer: Mapping[str, np.ndarray], spec_name: str, outputs: Sequence[str]) -> None:
    asyncio.run(ImportedFaceDetector(Answers(answer), DETECTOR_MODELS[spec_name], outputs).detect(FRAME))


def test_a_missing_yolo_output_fails_naming_the_model() -> None:
    with pytest.raises(FailedPrecondition, match=r"model yoloface_8n returned nothing for 1 frames"):
        detect_with({}, "yoloface_8n", ["output0"])


def test_an_empty_yolo_output_fails_naming_the_model() -> None:
    with pytest.raises(FailedPrecondition, match=r"model yoloface_8n returned shape \(1, 20, 0\)"):
        detect_with({"output0": np.zeros((1, 20, 0), np.float32)}, "yoloface_8n", ["output0"])


def test_a_misshapen_anchor_stride_output_fails_naming_the_model() -> None:
    names = [f"o{index}" for index in range(9)]
    # Every output a column of scores: the boxes and landmarks have too few values.
    answer = {name: np.zeros(((12800, 3200, 800)[index % 3], 1)) for index, name in enumerate(names)}
    with pytest.raises(FailedPrecondition, match=r"model retinaface_10g returned shape \(12800, 1\) as output 3"):
        detect_with(answer, "retinaface_10g", names)


class ByModel:
    """A ModelRunner answering per model; notes the models asked."""

    def __init__(self, answers: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.answers = answers
        self.models: list[str] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.models.append(model)
        return dict(self.answers[model])


def test_a_nan_answer_is_asked_again_of_the_fp32_twin_and_tallied_for_the_request() -> None:
    finite = np.zeros((1, 20, 8400), np.float32)
    runner = ByModel({"yoloface_8n": {"output0": finite + np.nan}, "yoloface_8n_fp32": {"output0": finite}})
    tally = FallbackTally()
    token = REQUEST_FALLBACKS.set(tally)
    try:
        faces = asyncio.run(ImportedFaceDetector(runner, DETECTOR_MODELS["yoloface_8n"], ["output0"]).detect(FRAME))
    finally:
        REQUEST_FALLBACKS.reset(token)
    assert (faces, runner.models, tally.count) == ([[]], ["yoloface_8n", "yoloface_8n_fp32"], 1)


def test_a_model_serving_other_outputs_than_its_layout_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match=r"model scrfd_2.5g serves 1 outputs; its anchor_strides layout has 9"):
        detect_with({}, "scrfd_2.5g", ["output0"])


class Triton:
    """Readiness and output names as a Triton serving `ready` would give them."""

    def __init__(self, ready: Sequence[str]) -> None:
        self.ready = set(ready)
        self.asked_outputs: list[str] = []

    async def is_model_ready(self, model: str) -> bool:
        return model in self.ready

    async def output_names(self, model: str) -> Sequence[str]:
        self.asked_outputs.append(model)
        return ["output0"]

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        raise Unavailable(f"triton model {model}: not in this test")


def test_an_imported_name_gets_its_detector_made_once() -> None:
    triton = Triton([CASCADE_MODEL, "yoloface_8n"])
    chosen = ChosenDetector(triton, triton, "auto")
    first, again = asyncio.run(chosen.for_model("yoloface_8n")), asyncio.run(chosen.for_model("yoloface_8n"))
    assert (type(first), first is again, triton.asked_outputs) == (ImportedFaceDetector, True, ["yoloface_8n"])


@pytest.mark.parametrize("model", ["", "mtcnn"])
def test_the_built_in_name_or_none_is_mtcnn(model: str) -> None:
    triton = Triton([PNET_MODEL])
    chosen = ChosenDetector(triton, triton, "auto")
    assert asyncio.run(chosen.for_model(model)) is chosen


def test_an_unknown_detector_is_invalid_naming_the_choices() -> None:
    triton = Triton([PNET_MODEL])
    with pytest.raises(InvalidArgument, match=f"detector model 'yunet' is not one of {', '.join(DETECTOR_NAMES)}"):
        asyncio.run(ChosenDetector(triton, triton, "auto").for_model("yunet"))


def test_a_known_detector_triton_does_not_serve_is_not_installed() -> None:
    triton = Triton([PNET_MODEL])
    with pytest.raises(
        FailedPrecondition, match=r"detector model scrfd_2\.5g is not installed; `swapline models import`"
    ):
        asyncio.run(ChosenDetector(triton, triton, "auto").for_model("scrfd_2.5g"))


def test_a_detector_asked_before_triton_answers_is_unavailable() -> None:
    triton = Triton([])
    with pytest.raises(Unavailable, match=r"detector model scrfd_2\.5g is not ready"):
        asyncio.run(ChosenDetector(triton, triton, "auto").for_model("scrfd_2.5g"))


def test_the_servicer_passes_the_requests_model_through() -> None:
    triton = Triton([PNET_MODEL])
    request = detector_pb2.DetectRequest(frames=pack_frames(FRAME, [0]), model="retinaface_10g")
    servicer = DetectorServicer(ChosenDetector(triton, triton, "auto"))
    with pytest.raises(FailedPrecondition, match="detector model retinaface_10g is not installed"):
        asyncio.run(servicer.Detect(parse_detect_request(request.SerializeToString()), None))


def test_a_service_of_one_detector_refuses_a_named_model() -> None:
    triton = Triton([PNET_MODEL])
    request = detector_pb2.DetectRequest(frames=pack_frames(FRAME, [0]), model="yoloface_8n")
    servicer = DetectorServicer(FaceDetector(triton))
    with pytest.raises(InvalidArgument, match="serves the built-in model only"):
        asyncio.run(servicer.Detect(parse_detect_request(request.SerializeToString()), None))


@pytest.mark.parametrize("name", sorted(DETECTOR_MODELS))
def test_the_services_facts_agree_with_the_importers_contract(name: str) -> None:
    # The service may not import services/model_build; this keeps its few facts from drifting off the
    # contracts that every installed file was checked against.
    from services.model_build.face_model_contracts import CONTRACTS

    contract, spec = CONTRACTS[name], DETECTOR_MODELS[name]
    scaling = (contract.pixel_scaling.offset, contract.pixel_scaling.divisor)
    assert (
        contract.detector_layout,
        scaling,
        contract.channel_order,
        contract.input_size,
        contract.inputs[0].name,
    ) == (
        spec.layout,
        (spec.scaling.offset, spec.scaling.divisor),
        "bgr",
        640,
        "input",
    )
    assert len(contract.outputs) == spec.output_count

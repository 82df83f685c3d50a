from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from services.common.torch_runtime import run_requests
from services.detector.box_ops import crop_with_padding, greedy_nms, grid_boxes
from services.detector.box_ops import nms as reference_nms
from services.detector.box_ops import pyramid_crops as reference_pyramid_crops
from services.detector.face_detector import (
    CASCADE_MAX_BATCH,
    CASCADE_MODEL,
    CASCADE_OPTIONS,
    CASCADE_OUTPUTS,
    MAX_FACES,
    DetectionDefaults,
)
from services.model_build.mtcnn_cascade import (
    TORCHSCRIPT_FILE,
    MtcnnCascade,
    crop_boxes,
    load_mtcnn_cascade,
    mtcnn_cascade_state_dict,
    new_mtcnn_cascade,
    nms,
    pyramid_crops,
    resize_area,
    write_mtcnn_cascade,
)
from services.model_build.mtcnn_export import read_state_dict
from services.model_build.mtcnn_nets import MTCNN_STAGES
from services.model_build.torch_models import torch_model_from_config
from services.triton.model_config import read_model_config, torch_weights_path

REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
WEIGHTS_WHEEL = Path(__file__).resolve().parents[2] / "build/weights/facenet_pytorch-2.6.0-py3-none-any.whl"
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """torch's threads contend with the other tests' processes on a small CI machine (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cascade() -> MtcnnCascade:
    return load_mtcnn_cascade(WEIGHTS_WHEEL)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


def options(count: int, **overrides: float) -> torch.Tensor:
    """`count` rows of the detector's default thresholds, some replaced (unchecked, to test refusals)."""
    values = {**dataclasses.asdict(DetectionDefaults()), **overrides}
    return torch.tensor([[values[name] for name in CASCADE_OPTIONS]] * count, dtype=torch.float32)


def run(module: torch.nn.Module, frames: np.ndarray, option_rows: torch.Tensor) -> Outputs:
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(frames)), option_rows)


def test_pyramid_levels_are_opencv_inter_area(astronaut: np.ndarray) -> None:
    frames = torch.from_numpy(astronaut[None]).float()
    for height, width in [(154, 154), (109, 110), (37, 23), (512, 512)]:
        expected = cv2.resize(astronaut, (width, height), interpolation=cv2.INTER_AREA)
        resized = resize_area(frames, height, width)[0].numpy()
        difference = np.abs(resized - expected)
        # OpenCV accumulates in float32 too; a sum landing on .5 may round the other way.
        assert difference.max() <= 1 and np.mean(difference > 0) < 1e-3


def crop(image: np.ndarray, box: np.ndarray, side: int, extra_span: int = 0) -> np.ndarray:
    """crop_boxes over one image, gathering `extra_span` more pixels a side than the box needs."""
    height, width = image.shape[:2]
    span = int(max(box[2] - box[0], box[3] - box[1], 1)) + extra_span
    pixels = torch.from_numpy(image).float().reshape(-1, 3)
    one = torch.ones(1, dtype=torch.int64)
    crops = crop_boxes(pixels, 0 * one, height * one, width * one, torch.from_numpy(box[None]), side, span)
    return crops[0].numpy()


def test_crops_are_box_ops_crops_zero_padded_outside_the_frame(astronaut: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    shrunk: list[float] = []
    enlarged: list[float] = []
    for number in range(200):
        side = int(rng.choice([24, 48]))
        size = int(rng.integers(4, 160))
        x1, y1 = (int(v) for v in rng.integers(-40, 520, 2))
        box = np.array([x1, y1, x1 + size, y1 + size + int(rng.integers(-1, 2))], np.float32)
        expected = crop_with_padding(astronaut, box, side)
        # A gather wider than the box (a batch's longest box sets it) must not change the crop.
        difference = np.abs(crop(astronaut, box, side, extra_span=number % 2 * 9) - expected)
        assert difference.max() <= 1
        (enlarged if min(box[2] - box[0], box[3] - box[1]) < side else shrunk).append(np.mean(difference > 0))
    # Shrinking matches to float rounding; enlarging differs by OpenCV's 11-bit fixed-point weights.
    assert np.mean(shrunk) < 1e-3 and np.mean(enlarged) < 0.1
    outside = crop(astronaut, np.array([-60.0, -60.0, -12.0, -12.0], np.float32), 24)
    assert float(np.abs(outside).max()) == 0.0


def test_crops_come_from_their_own_frame_and_level(cascade: MtcnnCascade, astronaut: np.ndarray) -> None:
    frames = torch.from_numpy(np.stack([astronaut, astronaut[:, ::-1]]).copy())
    pyramid, levels = cascade.build_pyramid(frames, [0.5, 0.3])
    boxes = torch.tensor([[100.0, 60.0, 180.0, 140.0], [10.0, 20.0, 30.0, 40.0], [-8.0, 400.0, 150.0, 560.0]])
    for frame in range(2):
        crops, covered = pyramid_crops(pyramid, torch.full((3,), frame), boxes, 24)
        level_images = [level[frame : frame + 1].numpy().astype(np.uint8) for level in levels]
        expected, expected_covered = reference_pyramid_crops(level_images, np.zeros(3, np.intp), boxes.numpy(), 24)
        assert np.abs(crops.numpy() - expected).max() <= 1
        np.testing.assert_allclose(covered.numpy(), expected_covered, atol=1e-4)


def random_boxes(rng: np.random.Generator, count: int, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    corners = rng.uniform(-20, 200, (count, 2)).astype(np.float32)
    sizes = rng.uniform(5, 60, (count, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    return boxes, rng.uniform(0, 1, count).astype(np.float32), rng.integers(0, groups, count)


def torch_nms(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, by_smaller_area: bool, **block: int
) -> np.ndarray:
    group_count = int(groups.max()) + 1 if len(groups) else 0
    kept = nms(
        torch.from_numpy(boxes),
        torch.from_numpy(scores),
        torch.from_numpy(groups),
        group_count,
        threshold,
        by_smaller_area,
        **block,
    )
    return kept.numpy()


def by_group(kept: np.ndarray, groups: np.ndarray) -> list[list[int]]:
    """Kept indices per group, in their order: box_ops.nms orders all groups by score, torch's nms by group."""
    return [[int(index) for index in kept if groups[index] == group] for group in range(int(groups.max()) + 1)]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_union_nms_keeps_what_box_ops_nms_keeps(threshold: float) -> None:
    rng = np.random.default_rng(int(threshold * 10))
    boxes, scores, groups = random_boxes(rng, 400, 5)
    expected = reference_nms(boxes, scores, threshold, "union", groups)
    kept = torch_nms(boxes, scores, groups, threshold, False)
    assert by_group(kept, groups) == by_group(expected, groups)
    assert 5 < len(kept) < len(boxes)


def test_union_nms_decides_ties_on_the_pnet_grid_as_opencv_does() -> None:
    # Neighbouring P-Net windows overlap by exactly 0.5 before scaling; float32 scaling leaves some a few
    # 1e-8 above it, where OpenCV's float32 overlap still reads 0.5 and keeps the box.
    rng = np.random.default_rng(11)
    probability = rng.uniform(0.5, 1.0, (2, 30, 30)).astype(np.float32)
    regression = np.zeros((2, 4, 30, 30), np.float32)
    for scale in (0.3, 0.2127, 0.150804, 0.10692):
        frame_index, boxes, scores, _ = grid_boxes(probability, regression, scale, 0.6)
        expected = reference_nms(boxes, scores, 0.5, "union", frame_index)
        assert by_group(torch_nms(boxes, scores, frame_index, 0.5, False), frame_index) == by_group(
            expected, frame_index
        )


def test_min_nms_keeps_what_greedy_nms_keeps() -> None:
    boxes, scores, groups = random_boxes(np.random.default_rng(3), 300, 4)
    expected = greedy_nms(boxes, scores, 0.7, "min", groups)
    assert by_group(torch_nms(boxes, scores, groups, 0.7, True), groups) == by_group(expected, groups)


def test_nms_in_column_blocks_keeps_the_same_boxes() -> None:
    boxes, scores, groups = random_boxes(np.random.default_rng(8), 500, 2)
    whole = torch_nms(boxes, scores, groups, 0.5, False)
    blocked = torch_nms(boxes, scores, groups, 0.5, False, block_elements=2000)
    assert blocked.tolist() == whole.tolist()


def test_nms_of_nothing_keeps_nothing() -> None:
    empty = np.zeros((0, 4), np.float32)
    assert torch_nms(empty, np.zeros(0, np.float32), np.zeros(0, np.int64), 0.5, False).tolist() == []


def test_frames_with_different_options_are_run_in_groups(cascade: MtcnnCascade, astronaut: np.ndarray) -> None:
    alone = run(cascade, astronaut[None], options(1))
    frames = np.stack([astronaut, astronaut, astronaut, astronaut])
    rows = torch.cat([options(1), options(1, min_score=1.0), options(1, min_face_size=2000), options(1)])
    boxes, scores, landmarks, counts = run(cascade, frames, rows)
    assert counts[:, 0].tolist() == [1, 0, 0, 1]
    for frame in (0, 3):
        # Batch size changes which convolution kernels run, so equal up to float rounding.
        assert torch.allclose(boxes[frame], alone[0][0], atol=1e-3)
        assert torch.allclose(landmarks[frame], alone[2][0], atol=1e-3)
    assert float(scores[1:3].abs().max()) == 0.0 and float(boxes[1:3].abs().max()) == 0.0
    # Rows past a frame's count are padding.
    assert float(boxes[0, 1:].abs().max()) == 0.0 and float(scores[0, 1:].abs().max()) == 0.0


def test_outputs_have_the_configured_layout(cascade: MtcnnCascade, astronaut: np.ndarray) -> None:
    boxes, scores, landmarks, counts = run(cascade, np.stack([astronaut] * 2), options(2))
    assert (boxes.shape, scores.shape, landmarks.shape, counts.shape) == (
        (2, MAX_FACES, 4),
        (2, MAX_FACES),
        (2, MAX_FACES, 5, 2),
        (2, 1),
    )
    assert (boxes.dtype, scores.dtype, landmarks.dtype, counts.dtype) == (torch.float32,) * 3 + (torch.int32,)


def test_frames_smaller_than_a_pnet_window_have_no_faces(cascade: MtcnnCascade) -> None:
    boxes, _, _, counts = run(cascade, np.zeros((2, 20, 30, 3), np.uint8), options(2))
    assert counts[:, 0].tolist() == [0, 0] and float(boxes.abs().max()) == 0.0


@pytest.mark.parametrize(
    ("frames", "rows", "message"),
    [
        (np.zeros((1, 32, 32, 3), np.float32), options(1), "frames must be"),
        (np.zeros((1, 32, 32), np.uint8), options(1), "frames must be"),
        (np.zeros((2, 32, 32, 3), np.uint8), options(1), "options must be"),
        (np.zeros((1, 32, 32, 3), np.uint8), options(1, scale_factor=1.0), "scale_factor must be inside"),
        (np.zeros((1, 32, 32, 3), np.uint8), options(1, min_face_size=0), "min_face_size must be at least 1"),
        (np.zeros((1, 32, 32, 3), np.uint8), options(1, min_score=1.5), "scores must be inside"),
        (np.zeros((1, 32, 32, 3), np.uint8), options(1, pnet_score=float("nan")), "must be finite"),
    ],
)
def test_invalid_inputs_are_refused(
    cascade: MtcnnCascade, frames: np.ndarray, rows: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run(cascade, frames, rows)


def test_one_state_dict_carries_the_three_nets(cascade: MtcnnCascade) -> None:
    stage_state_dicts = {stage: read_state_dict(WEIGHTS_WHEEL, stage) for stage in MTCNN_STAGES}
    state_dict = mtcnn_cascade_state_dict(stage_state_dicts)
    assert set(state_dict) == set(new_mtcnn_cascade().state_dict())
    assert torch.equal(state_dict["onet.dense6_3.weight"], stage_state_dicts["onet"]["dense6_3.weight"])
    assert torch.equal(cascade.state_dict()["rnet.conv1.weight"], stage_state_dicts["rnet"]["conv1.weight"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_make_models_writes_torchscript_and_state_dict_that_answer_as_the_module(
    cascade: MtcnnCascade, astronaut: np.ndarray, tmp_path: Path
) -> None:
    torchscript, state_dict = write_mtcnn_cascade(WEIGHTS_WHEEL, tmp_path)
    assert torchscript == tmp_path / CASCADE_MODEL / "1" / TORCHSCRIPT_FILE
    assert state_dict == torch_weights_path(tmp_path, CASCADE_MODEL)
    assert sorted(path.name for path in torchscript.parent.iterdir()) == sorted([TORCHSCRIPT_FILE, state_dict.name])
    frames = np.stack([astronaut, astronaut[:, ::-1]])
    expected = run(cascade, frames, options(2))
    for answer in (
        run(torch.jit.load(str(torchscript)), frames, options(2)),
        run(load_state_into_new(state_dict), frames, options(2)),
    ):
        assert all(torch.equal(got, want) for got, want in zip(answer, expected, strict=True))
    assert expected[3][:, 0].tolist() == [1, 1]


def load_state_into_new(path: Path) -> MtcnnCascade:
    module = new_mtcnn_cascade()
    module.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return module.eval()


def test_production_config_matches_the_module() -> None:
    config = read_model_config(REPOSITORY, CASCADE_MODEL)
    assert config.platform == "pytorch_libtorch" and config.default_model_filename == TORCHSCRIPT_FILE
    assert config.max_batch_size == CASCADE_MAX_BATCH
    # The PyTorch backend binds inputs by forward()'s argument names and outputs by position.
    assert [tensor.name for tensor in config.input] == list(inspect.signature(MtcnnCascade.forward).parameters)[1:]
    assert [tensor.name for tensor in config.output] == list(CASCADE_OUTPUTS)
    assert list(config.input[1].dims) == [len(CASCADE_OPTIONS)]
    assert [list(tensor.dims) for tensor in config.output] == [[MAX_FACES, 4], [MAX_FACES], [MAX_FACES, 5, 2], [1]]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_served_as_a_torch_model_it_finds_the_face_in_either_precision(
    cascade: MtcnnCascade, astronaut: np.ndarray, precision: str
) -> None:
    served = torch_model_from_config(
        CASCADE_MODEL,
        load_mtcnn_cascade(WEIGHTS_WHEEL),
        read_model_config(REPOSITORY, CASCADE_MODEL),
        torch.device("cpu"),
        precision,  # type: ignore[arg-type]
    )
    expected = run(cascade, astronaut[None], options(1))
    request = {"frames": astronaut[None], "options": options(1).numpy()}
    first, second = run_requests(served, [request, request])
    assert list(first) == list(CASCADE_OUTPUTS) and first["counts"].dtype == np.int32
    for answer in (first, second):
        assert answer["counts"].tolist() == [[1]]
        # Half-precision nets move the box by a fraction of a pixel.
        assert np.abs(answer["boxes"][0, 0] - expected[0][0, 0].numpy()).max() < (1e-3 if precision == "fp32" else 2.0)

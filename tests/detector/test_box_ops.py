from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from services.detector.box_ops import (
    apply_regression,
    crop_with_padding,
    greedy_nms,
    grid_boxes,
    nms,
    pyramid_crops,
    pyramid_scales,
    snap_to_pixels,
    square_boxes,
)


def boxes(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.array(rows, np.float32)


def scores(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_nms_keeps_disjoint_boxes() -> None:
    assert nms(boxes((0, 0, 10, 10), (20, 20, 30, 30)), scores(0.8, 0.9), 0.5).tolist() == [1, 0]


def test_nms_suppresses_the_weaker_of_overlapping_boxes() -> None:
    assert nms(boxes((0, 0, 10, 10), (1, 1, 11, 11)), scores(0.9, 0.8), 0.5).tolist() == [0]


def test_nms_keeps_overlap_at_or_below_threshold() -> None:
    assert nms(boxes((0, 0, 10, 10), (1, 1, 11, 11)), scores(0.9, 0.8), 0.7).tolist() == [0, 1]


def test_nms_union_keeps_a_small_box_inside_a_big_one() -> None:
    assert nms(boxes((0, 0, 10, 10), (2, 2, 6, 6)), scores(0.9, 0.8), 0.5, "union").tolist() == [0, 1]


def test_nms_min_suppresses_a_small_box_inside_a_big_one() -> None:
    assert nms(boxes((0, 0, 10, 10), (2, 2, 6, 6)), scores(0.9, 0.8), 0.5, "min").tolist() == [0]


def test_nms_never_suppresses_across_groups() -> None:
    same = boxes((0, 0, 10, 10), (1, 1, 11, 11))
    assert nms(same, scores(0.9, 0.8), 0.5, groups=np.array([0, 1])).tolist() == [0, 1]


def test_nms_of_nothing_is_empty() -> None:
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_nms_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="not one of union, min"):
        nms(boxes((0, 0, 1, 1)), scores(1.0), 0.5, "max")  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_opencv_union_nms_matches_the_numpy_reference(threshold: float) -> None:
    rng = np.random.default_rng(7)
    corners = rng.uniform(-40, 300, (400, 2))
    sides = rng.uniform(8, 80, (400, 1))
    random_boxes = np.hstack([corners, corners + sides]).astype(np.float32)
    random_scores = rng.uniform(0, 1, 400).astype(np.float32)
    groups = rng.integers(0, 4, 400)
    fast = nms(random_boxes, random_scores, threshold, "union", groups)
    assert 0 < len(fast) < 400
    assert fast.tolist() == greedy_nms(random_boxes, random_scores, threshold, "union", groups).tolist()


def test_apply_regression_moves_edges_by_box_size() -> None:
    offsets = np.array([[0.1, -0.1, 0.2, 0.0]], np.float32)
    assert np.allclose(apply_regression(boxes((10, 10, 20, 30)), offsets), [[11, 8, 22, 30]])


def test_square_boxes_grows_the_short_side_around_the_centre() -> None:
    assert square_boxes(boxes((0, 0, 10, 20), (0, 0, 30, 10))).tolist() == [[-5, 0, 15, 20], [0, -10, 30, 20]]


def test_snap_to_pixels_rounds_half_up() -> None:
    assert snap_to_pixels(np.array([[0.5, 1.5, 2.5, 2.4]], np.float32)).tolist() == [[1, 2, 3, 2]]


def test_grid_boxes_maps_a_cell_back_to_frame_pixels() -> None:
    probability = np.zeros((2, 8, 8), np.float32)
    probability[1, 3, 5] = 0.9
    probability[0, 0, 0] = 0.5
    regression = np.zeros((2, 4, 8, 8), np.float32)
    regression[1, :, 3, 5] = [0.1, 0.2, 0.3, 0.4]
    frame_index, found, found_scores, offsets = grid_boxes(probability, regression, 0.5, 0.6)
    assert frame_index.tolist() == [1]
    assert found.tolist() == [[20, 12, 44, 36]]
    assert np.allclose(found_scores, [0.9]) and np.allclose(offsets, [[0.1, 0.2, 0.3, 0.4]])


def test_pyramid_scales_span_min_face_to_whole_frame() -> None:
    scales = pyramid_scales(360, 40, 0.709)
    assert scales[0] == pytest.approx(0.3)
    assert np.allclose(np.diff(np.log(scales)), np.log(0.709))
    assert 360 * scales[-1] >= 12 > 360 * scales[-1] * 0.709


def test_crop_inside_the_image_is_a_plain_resize() -> None:
    image = data.astronaut()
    expected = cv2.resize(image[50:150, 100:200], (24, 24), interpolation=cv2.INTER_AREA)
    assert np.array_equal(crop_with_padding(image, np.array([100, 50, 200, 150], np.float32), 24), expected)


def test_crop_pads_outside_the_image_with_black() -> None:
    crop = crop_with_padding(np.full((10, 10, 3), 255, np.uint8), np.array([-10, -10, 10, 10], np.float32), 20)
    assert crop[:10, :10].max() == 0 and crop[10:, 10:].min() == 255 and crop[:10, 10:].max() == 0


def test_crop_of_an_empty_box_is_refused() -> None:
    with pytest.raises(ValueError, match="is empty"):
        crop_with_padding(np.zeros((10, 10, 3), np.uint8), np.array([5, 5, 5, 9], np.float32), 24)


def test_pyramid_crops_resemble_crops_from_the_full_frame() -> None:
    frames = data.astronaut()[None]
    levels = [frames]
    for side in (154, 109, 77):
        levels.append(cv2.resize(frames[0], (side, side), interpolation=cv2.INTER_AREA)[None])
    face_boxes = boxes((170, 50, 280, 160), (-20, 300, 60, 380), (30, 30, 45, 45))
    crops, covered = pyramid_crops(levels, np.zeros(3, np.intp), face_boxes, 24)
    # The 110-pixel box comes from the 154-pixel level (33 pixels across there), snapped to its pixels;
    # the 15-pixel box is too small for any level and comes from the frame itself.
    assert not np.array_equal(covered[0], face_boxes[0])
    assert np.abs(covered[0] - face_boxes[0]).max() <= 0.5 * 512 / 154
    assert np.array_equal(covered[2], face_boxes[2])
    for crop, box in zip(crops, covered, strict=True):
        direct = crop_with_padding(frames[0], box, 24).astype(np.int16)
        assert np.abs(crop.astype(np.int16) - direct).mean() < 8


def test_nms_keeps_boxes_of_any_score() -> None:
    assert nms(boxes((0, 0, 10, 10), (20, 20, 30, 30)), scores(0.0, -1.0), 0.5).tolist() == [0, 1]

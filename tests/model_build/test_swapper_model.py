from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from matplotlib import cbook
from skimage import data

from services.common.face_geometry import CROP_SIZE, MASK_CENTER
from services.model_build.swapper_model import export_swapper
from services.worker.face_aligner import align_face, paste_back
from tests.support.identity_judge import IdentityJudge

FRAME_SHAPE = (720, 1280)
BACKGROUND_RGB = (70, 90, 110)
# The acceptance bar: the swapped face is the source person, and clearly not the original one.
MAX_DISTANCE_TO_SOURCE = 0.5
MIN_DISTANCE_MARGIN = 0.15


@dataclass(frozen=True)
class Sessions:
    fp16: ort.InferenceSession
    fp32: ort.InferenceSession


@dataclass(frozen=True)
class Person:
    photo: np.ndarray
    crop: np.ndarray
    descriptor: np.ndarray


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Sessions:
    folder = tmp_path_factory.mktemp("swapper")
    export_swapper(folder / "fp16" / "model.onnx")
    export_swapper(folder / "fp32" / "model.onnx", precision="fp32")
    providers = ["CPUExecutionProvider"]
    return Sessions(
        fp16=ort.InferenceSession(str(folder / "fp16" / "model.onnx"), providers=providers),
        fp32=ort.InferenceSession(str(folder / "fp32" / "model.onnx"), providers=providers),
    )


@pytest.fixture(scope="module")
def judge() -> IdentityJudge:
    return IdentityJudge()


def _person(judge: IdentityJudge, photo: np.ndarray) -> Person:
    points = judge.five_points(photo)
    descriptor = judge.descriptor(photo)
    assert points is not None and descriptor is not None
    return Person(photo=photo, crop=align_face(photo, points).crop, descriptor=descriptor)


@pytest.fixture(scope="module")
def astronaut(judge: IdentityJudge) -> Person:
    return _person(judge, data.astronaut())


@pytest.fixture(scope="module")
def hopper(judge: IdentityJudge) -> Person:
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return _person(judge, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))


def _nchw(crops: list[np.ndarray], dtype: type[np.floating]) -> np.ndarray:
    return (np.stack(crops).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).astype(dtype)


def _swap(session: ort.InferenceSession, targets: list[np.ndarray], sources: list[np.ndarray]) -> list[np.ndarray]:
    inputs = {"target": _nchw(targets, np.float16), "source": _nchw(sources, np.float16)}
    swapped, mask = session.run(["swapped", "mask"], inputs)
    return [swapped, mask]


def _relit(crop: np.ndarray, gain: np.ndarray | float) -> np.ndarray:
    return np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _face_core() -> tuple[slice, slice]:
    """A box well inside the face region of the canonical crop, (rows, columns) slices."""
    centre_x, centre_y = (int(value * CROP_SIZE) for value in MASK_CENTER)
    half = CROP_SIZE // 10
    return np.s_[centre_y - half : centre_y + half, centre_x - half : centre_x + half]


def test_outputs_are_fp16_with_a_mask_that_covers_only_the_face(sessions: Sessions) -> None:
    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, (CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8) for _ in range(3)]
    swapped, mask = _swap(sessions.fp16, batch, batch[::-1])

    assert swapped.dtype == np.float16 and mask.dtype == np.float16
    assert swapped.shape == (3, 3, CROP_SIZE, CROP_SIZE)
    assert mask.shape == (3, 1, CROP_SIZE, CROP_SIZE)
    assert np.isfinite(swapped).all()
    assert swapped.min() >= 0.0 and swapped.max() <= 1.0
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    for row, column in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert np.all(mask[:, 0, row, column] == 0.0)
    assert np.all(mask[(slice(None), 0, *_face_core())] > 0.99)


def test_crop_outside_the_face_region_is_the_target(sessions: Sessions, astronaut: Person, hopper: Person) -> None:
    swapped, mask = _swap(sessions.fp16, [astronaut.crop], [hopper.crop])
    outside = mask[0, 0] == 0
    target = _nchw([astronaut.crop], np.float16)[0]
    np.testing.assert_array_equal(swapped[0][:, outside], target[:, outside])
    assert np.abs(swapped[0][:, ~outside].astype(np.float32) - target[:, ~outside]).mean() > 0.02


def test_face_brightness_follows_the_target(sessions: Sessions, astronaut: Person, hopper: Person) -> None:
    dark_target, bright_target = _relit(astronaut.crop, 0.4), _relit(astronaut.crop, 1.3)
    swapped, _ = _swap(sessions.fp16, [dark_target, bright_target], [hopper.crop, hopper.crop])
    core = _face_core()
    dark_face, bright_face = (swapped[index][(slice(None), *core)].astype(np.float32).mean() for index in (0, 1))
    dark_target_face = dark_target[core].mean() / 255.0
    bright_target_face = bright_target[core].mean() / 255.0

    assert dark_face < 0.6 * bright_face
    # Not merely darker: each face takes its own target's brightness, whatever the source's was.
    assert dark_face == pytest.approx(dark_target_face, rel=0.2)
    assert bright_face == pytest.approx(bright_target_face, rel=0.2)


def test_shading_direction_and_colour_cast_follow_the_target(
    sessions: Sessions, astronaut: Person, hopper: Person
) -> None:
    columns = np.linspace(0.5, 1.5, CROP_SIZE, dtype=np.float32)[None, :, None]
    left_lit = _relit(astronaut.crop, columns[:, ::-1])
    right_lit = _relit(astronaut.crop, columns)
    warm = _relit(astronaut.crop, np.array([1.2, 1.0, 0.6], np.float32))
    swapped, _ = _swap(sessions.fp16, [left_lit, right_lit, warm], [hopper.crop] * 3)
    rows, face_columns = _face_core()
    middle = (face_columns.start + face_columns.stop) // 2
    half_width = face_columns.stop - face_columns.start

    def left_over_right(image: np.ndarray) -> float:
        face = image[:, rows].astype(np.float32)
        return float(face[..., middle - half_width : middle].mean() / face[..., middle : middle + half_width].mean())

    # The two targets differ only in the light's side (their left/right ratios differ by about 1.5x);
    # a swap that ignored the target's shading would give both faces the same ratio.
    assert left_over_right(swapped[0]) / left_over_right(swapped[1]) > 1.3
    assert left_over_right(swapped[0]) > 1.0 > left_over_right(swapped[1])

    neutral, _ = _swap(sessions.fp16, [astronaut.crop], [hopper.crop])

    def red_over_blue(image: np.ndarray) -> float:
        face = image[(slice(None), *_face_core())].astype(np.float32)
        return float(face[0].mean() / face[2].mean())

    assert red_over_blue(swapped[2]) > 1.5 * red_over_blue(neutral[0])


def test_fp16_matches_fp32_on_real_crops(sessions: Sessions, astronaut: Person, hopper: Person) -> None:
    targets = [astronaut.crop, hopper.crop, _relit(astronaut.crop, 0.3), _relit(hopper.crop, 1.4)]
    sources = [hopper.crop, astronaut.crop, hopper.crop, astronaut.crop]
    half = sessions.fp16.run(None, {"target": _nchw(targets, np.float16), "source": _nchw(sources, np.float16)})
    full = sessions.fp32.run(None, {"target": _nchw(targets, np.float32), "source": _nchw(sources, np.float32)})
    assert full[0].dtype == np.float32
    for half_output, full_output in zip(half, full, strict=True):
        for half_image, full_image in zip(half_output, full_output, strict=True):
            mse = float(np.mean((half_image.astype(np.float32) - full_image) ** 2))
            assert 10 * np.log10(1.0 / max(mse, 1e-12)) > 40.0


def _scene(photo: np.ndarray, scale: float, angle: float, centre: tuple[int, int]) -> np.ndarray:
    height, width = photo.shape[:2]
    matrix = np.asarray(cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale), np.float64)
    matrix[:, 2] += np.array(centre, np.float64) - (width / 2, height / 2)
    frame = np.full((*FRAME_SHAPE, 3), BACKGROUND_RGB, np.uint8)
    return cv2.warpAffine(photo, matrix, FRAME_SHAPE[::-1], dst=frame, borderMode=cv2.BORDER_TRANSPARENT)


def _lighting(frame: np.ndarray, kind: str, face_x: float) -> np.ndarray:
    pixels = frame.astype(np.float32)
    if kind == "darker":
        pixels *= 0.5
    elif kind == "brighter":
        pixels = 255.0 * (pixels / 255.0) ** 0.6
    elif kind == "colour_cast":
        pixels *= np.array([1.15, 0.95, 0.7], np.float32)
    elif kind == "gradient":
        columns = np.arange(FRAME_SHAPE[1], dtype=np.float32)
        pixels *= np.clip(0.8 + (columns - face_x) / 300.0, 0.3, 1.4)[None, :, None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


IDENTITY_CONDITIONS = [
    # (target is the astronaut, scale, angle in degrees, face position, lighting)
    (True, 1.0, 0.0, (640, 360), "darker"),
    (True, 1.3, 12.0, (500, 380), "brighter"),
    (True, 0.75, -15.0, (800, 330), "gradient"),
    (True, 1.0, 8.0, (700, 340), "colour_cast"),
    (False, 0.9, -10.0, (600, 400), "gradient"),
    (False, 1.0, 0.0, (640, 360), "darker"),
]


@pytest.mark.parametrize(("astronaut_is_target", "scale", "angle", "centre", "lighting"), IDENTITY_CONDITIONS)
def test_swapped_frame_is_judged_as_the_source_person(
    sessions: Sessions,
    judge: IdentityJudge,
    astronaut: Person,
    hopper: Person,
    astronaut_is_target: bool,
    scale: float,
    angle: float,
    centre: tuple[int, int],
    lighting: str,
) -> None:
    target, source = (astronaut, hopper) if astronaut_is_target else (hopper, astronaut)
    scene = _scene(target.photo, scale, angle, centre)
    frame = _lighting(scene, lighting, face_x=centre[0])
    points = judge.five_points(frame)
    assert points is not None
    aligned = align_face(frame, points)

    swapped, mask = _swap(sessions.fp16, [aligned.crop], [source.crop])
    swapped_rgb = np.clip(swapped[0].astype(np.float32).transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    output = frame.copy()
    paste_back(output, swapped_rgb, mask[0, 0].astype(np.float32), aligned.matrix)

    descriptor = judge.descriptor(output)
    assert descriptor is not None
    to_source = judge.distance(descriptor, source.descriptor)
    to_original = judge.distance(descriptor, target.descriptor)
    assert to_source < MAX_DISTANCE_TO_SOURCE
    assert to_original - to_source >= MIN_DISTANCE_MARGIN

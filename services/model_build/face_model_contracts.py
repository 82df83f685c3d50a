"""The contracts of the FaceFusion face models a user brings: every tensor, and how the pipeline feeds them.

Issue 12's contract section is the authority. FaceFusion's public code fills in what it leaves open:
`facefusion/face_detector.py` (forward_with_* and detect_with_*), `face_recognizer.py`,
`processors/modules/face_swapper/core.py`, `model_helper.py` and `face_helper.py`. Models are keyed
by FaceFusion's file stems, the names users have in their `.assets/models` folder.

A contract is written so that the released file passes it:
- a shape entry of None is any size, fixed or dynamic; a fixed entry must match a fixed dimension of
  the file, while a dynamic dimension of the file is accepted (it takes the size when it runs);
- a tensor with a batch axis has it first; the file may fix it at 1 (as inswapper's release does) or
  leave it dynamic, and the importer rewrites a batch fixed at 1 so that Triton can batch the model;
- a tensor without a name is matched by position: the detectors' outputs carry whatever names their
  exporter gave them, and FaceFusion reads them by position only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from services.common.errors import InvalidArgument
from services.common.face_detector_models import (
    ANCHOR_STRIDE_SCALING,
    FEATURE_STRIDES,
    LANDMARK_POINTS,
    YOLO_CANDIDATES,
    YOLO_ROW_VALUES,
    DetectorLayout,
)
from services.common.face_detector_models import DETECTOR_CANVAS as DETECTOR_SIZE
from services.common.face_model_catalog import (
    SYMMETRIC_RANGE,
    UNIT_RANGE,
    PixelScaling,
    SourceKind,
    WarpTemplate,
)

ModelRole = Literal["swapper", "embedder", "detector"]
MODEL_ROLES: tuple[ModelRole, ...] = get_args(ModelRole)

# Element types by their numpy names. FaceFusion feeds every model float32 arrays
# (`.astype(numpy.float32)` in each prepare_* function), so its files, the fp16 release included,
# take and give float32: FP16 lives inside the graph, behind Cast nodes.
TensorDtype = Literal["float32", "float16"]
TENSOR_DTYPES: tuple[TensorDtype, ...] = get_args(TensorDtype)

# The order of the image channels a model takes. FaceFusion's frames are OpenCV's BGR: the swappers and
# the recogniser flip them to RGB (`[:, :, ::-1]` in prepare_crop_frame and calculate_face_embedding),
# while prepare_detect_frame hands the detectors BGR as it is.
ChannelOrder = Literal["rgb", "bgr"]
CHANNEL_ORDERS: tuple[ChannelOrder, ...] = get_args(ChannelOrder)

EMBEDDING_SIZE = 512
# inswapper's emap projects the 512-d embedding to the 512-d source latent.
EMAP_SHAPE = (EMBEDDING_SIZE, EMBEDDING_SIZE)
SCORE_VALUES = 1
BOX_VALUES = 4
ONNX_SUFFIX = ".onnx"


@dataclass(frozen=True)
class TensorContract:
    """One input or output. `shape` holds the whole shape; where `batch_axis`, its first entry is the
    batch and is None (the file's batch may be 1 or dynamic). `name` None: matched by position."""

    name: str | None
    dtypes: tuple[TensorDtype, ...]
    shape: tuple[int | None, ...]
    batch_axis: bool

    def __post_init__(self) -> None:
        if self.batch_axis and (not self.shape or self.shape[0] is not None):
            raise ValueError(f"tensor {self.name!r}: a batch axis is the first entry of the shape and is None")


@dataclass(frozen=True)
class ModelContract:
    """What a FaceFusion model file must be, and what the pipeline needs to run it.

    `input_size` is the side of the square image the model takes: the crop for swappers and the
    recogniser, the detection canvas for detectors. `template` (swappers and the recogniser) names the
    five-point template the crop is warped onto; `source_kind` (swappers) how the source input is made;
    `detector_layout` (detectors) how the outputs are decoded. Where `extra_outputs_ignored`, outputs
    after those in `outputs` are accepted and never served.
    """

    stem: str
    role: ModelRole
    inputs: tuple[TensorContract, ...]
    outputs: tuple[TensorContract, ...]
    input_size: int
    pixel_scaling: PixelScaling
    channel_order: ChannelOrder
    template: WarpTemplate | None = None
    source_kind: SourceKind | None = None
    detector_layout: DetectorLayout | None = None
    extra_outputs_ignored: bool = False

    def __post_init__(self) -> None:
        if (self.template is None) != (self.role == "detector"):
            raise ValueError(f"{self.stem}: swappers and the recogniser have a crop template, detectors none")
        if (self.source_kind is None) != (self.role != "swapper"):
            raise ValueError(f"{self.stem}: a swapper, and only a swapper, has a source kind")
        if (self.detector_layout is None) != (self.role != "detector"):
            raise ValueError(f"{self.stem}: a detector, and only a detector, has an output layout")

    @property
    def file_name(self) -> str:
        return f"{self.stem}{ONNX_SUFFIX}"


FLOAT32: tuple[TensorDtype, ...] = ("float32",)


def _image(name: str | None, side: int | None) -> TensorContract:
    return TensorContract(name, FLOAT32, (None, 3, side, side), batch_axis=True)


def _embedding(name: str | None) -> TensorContract:
    return TensorContract(name, FLOAT32, (None, EMBEDDING_SIZE), batch_axis=True)


def _inswapper(stem: str) -> ModelContract:
    crop = 128
    return ModelContract(
        stem=stem,
        role="swapper",
        # Named as the issue names them; FaceFusion's forward_swap_face feeds them by these names too.
        inputs=(_image("target", crop), _embedding("source")),
        outputs=(_image("output", crop),),
        input_size=crop,
        pixel_scaling=UNIT_RANGE,
        channel_order="rgb",
        template="arcface_128",
        source_kind="emap_embedding",
    )


def _hyperswap(stem: str) -> ModelContract:
    crop = 256
    return ModelContract(
        stem=stem,
        role="swapper",
        # forward_swap_face feeds every embedding swapper by the names "target" and "source".
        inputs=(_image("target", crop), _embedding("source")),
        # FaceFusion reads output 0 only (`run(None, ...)[0][0]`) and never by name, so the swapped crop
        # is matched by position. HyperSwap's released files are reported to give its masker's mask after
        # it ("mask", of no published layout), which FaceFusion ignores: further outputs are accepted and
        # not served.
        outputs=(_image(None, crop),),
        input_size=crop,
        pixel_scaling=SYMMETRIC_RANGE,
        channel_order="rgb",
        template="arcface_128",
        source_kind="normalised_embedding",
        extra_outputs_ignored=True,
    )


def _arcface(stem: str) -> ModelContract:
    crop = 112
    return ModelContract(
        stem=stem,
        role="embedder",
        inputs=(_image("input", crop),),
        # face_recognizer.forward reads output 0 only; the embedding's name is the exporter's.
        outputs=(_embedding(None),),
        input_size=crop,
        pixel_scaling=SYMMETRIC_RANGE,
        channel_order="rgb",
        template="arcface_112_v2",
    )


def _yoloface(stem: str) -> ModelContract:
    return ModelContract(
        stem=stem,
        role="detector",
        # forward_with_yolo_face feeds "input"; FaceFusion offers yoloface at 640x640 only.
        inputs=(_image("input", DETECTOR_SIZE),),
        # detect_with_yolo_face squeezes the batch and transposes to one row per candidate; the
        # candidates are those of strides 8, 16 and 32 on the 640 canvas (6400 + 1600 + 400).
        outputs=(TensorContract(None, FLOAT32, (None, YOLO_ROW_VALUES, YOLO_CANDIDATES), batch_axis=True),),
        input_size=DETECTOR_SIZE,
        # normalize_detect_frame for the [0, 1] range.
        pixel_scaling=UNIT_RANGE,
        channel_order="bgr",
        detector_layout="yolo_rows",
    )


def _anchor_stride_detector(stem: str) -> ModelContract:
    # detect_with_scrfd and detect_with_retinaface index the outputs by position: scores at 0..2, boxes
    # at 3..5, landmarks at 6..8 (feature_map_channel = 3), each 2-D: numpy.where(scores >= t)[0] picks
    # rows, and a score is read as row[0]. The exporters' names are anonymous node numbers, and the row
    # count follows the canvas (its height and width are dynamic in these files).
    outputs = tuple(
        TensorContract(None, FLOAT32, (None, values), batch_axis=False)
        for values in (SCORE_VALUES, BOX_VALUES, LANDMARK_POINTS * 2)
        for _stride in FEATURE_STRIDES
    )
    return ModelContract(
        stem=stem,
        role="detector",
        inputs=(_image("input", None),),
        outputs=outputs,
        input_size=DETECTOR_SIZE,
        pixel_scaling=ANCHOR_STRIDE_SCALING,
        channel_order="bgr",
        detector_layout="anchor_strides",
    )


CONTRACTS: Mapping[str, ModelContract] = MappingProxyType(
    {
        contract.stem: contract
        for contract in (
            _inswapper("inswapper_128"),
            _inswapper("inswapper_128_fp16"),
            _hyperswap("hyperswap_1a_256"),
            _hyperswap("hyperswap_1b_256"),
            _hyperswap("hyperswap_1c_256"),
            _arcface("arcface_w600k_r50"),
            _yoloface("yoloface_8n"),
            _anchor_stride_detector("scrfd_2.5g"),
            _anchor_stride_detector("retinaface_10g"),
        )
    }
)


def contract_for_file(path: Path) -> ModelContract:
    """The contract of a model file, by its FaceFusion file name (`<stem>.onnx`)."""
    contract = CONTRACTS.get(path.stem) if path.suffix == ONNX_SUFFIX else None
    if contract is None:
        known = ", ".join(contract.file_name for contract in CONTRACTS.values())
        raise InvalidArgument(f"{path.name}: not a face model file name known here; the known names are {known}")
    return contract

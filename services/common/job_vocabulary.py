"""Allowed-value sets that gateway, worker and clients share, and their one mapping to the proto enums."""

from __future__ import annotations

from typing import Literal, get_args

from services.common.errors import InvalidArgument
from swapline.jobs.v1 import jobs_pb2

SelectorMode = Literal["one", "many", "reference"]
SELECTOR_MODES: tuple[SelectorMode, ...] = get_args(SelectorMode)

# The chunk pipeline's stages, in pipeline order.
StageName = Literal["decode", "detect", "swap", "paste", "encode"]
STAGE_NAMES: tuple[StageName, ...] = get_args(StageName)

_SELECTOR_TO_PROTO: dict[SelectorMode, jobs_pb2.FaceSelectorMode] = {
    "one": jobs_pb2.FACE_SELECTOR_MODE_ONE,
    "many": jobs_pb2.FACE_SELECTOR_MODE_MANY,
    "reference": jobs_pb2.FACE_SELECTOR_MODE_REFERENCE,
}
# An unspecified selector swaps the largest face: the least surprising choice when a video holds
# more people than the caller expected.
_SELECTOR_FROM_PROTO: dict[int, SelectorMode] = {
    jobs_pb2.FACE_SELECTOR_MODE_UNSPECIFIED: "one",
    **{value: mode for mode, value in _SELECTOR_TO_PROTO.items()},
}


def selector_mode_to_proto(mode: SelectorMode) -> jobs_pb2.FaceSelectorMode:
    return _SELECTOR_TO_PROTO[mode]


def selector_mode_from_proto(value: int) -> SelectorMode:
    mode = _SELECTOR_FROM_PROTO.get(value)
    if mode is None:
        raise InvalidArgument(f"unknown face selector mode {value}")
    return mode

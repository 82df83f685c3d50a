"""What Probe tells about a media file, shared by the decoder (which answers) and the gateway (which plans)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from swapline.decoder.v1 import decoder_pb2

MediaKind = Literal["video", "image"]
MEDIA_KINDS: tuple[MediaKind, ...] = get_args(MediaKind)

_KIND_TO_PROTO: dict[MediaKind, decoder_pb2.MediaKind] = {
    "video": decoder_pb2.MEDIA_KIND_VIDEO,
    "image": decoder_pb2.MEDIA_KIND_IMAGE,
}
_KIND_FROM_PROTO: dict[int, MediaKind] = {value: kind for kind, value in _KIND_TO_PROTO.items()}


@dataclass(frozen=True)
class Keyframe:
    frame_index: int
    pts: int


@dataclass(frozen=True)
class MediaInfo:
    kind: MediaKind
    duration_seconds: float
    fps: float
    frame_count: int
    width: int
    height: int
    has_audio: bool
    keyframes: tuple[Keyframe, ...]
    video_codec: str = ""
    time_base: tuple[int, int] = (1, 1)


def media_info_to_proto(info: MediaInfo) -> decoder_pb2.MediaInfo:
    return decoder_pb2.MediaInfo(
        kind=_KIND_TO_PROTO[info.kind],
        duration_seconds=info.duration_seconds,
        fps=info.fps,
        frame_count=info.frame_count,
        width=info.width,
        height=info.height,
        has_audio=info.has_audio,
        keyframes=[decoder_pb2.Keyframe(frame_index=key.frame_index, pts=key.pts) for key in info.keyframes],
        video_codec=info.video_codec,
        time_base_num=info.time_base[0],
        time_base_den=info.time_base[1],
    )


def media_info_from_proto(message: decoder_pb2.MediaInfo) -> MediaInfo:
    return MediaInfo(
        kind=_KIND_FROM_PROTO.get(message.kind, "video"),
        duration_seconds=message.duration_seconds,
        fps=message.fps,
        frame_count=message.frame_count,
        width=message.width,
        height=message.height,
        has_audio=message.has_audio,
        keyframes=tuple(Keyframe(frame_index=key.frame_index, pts=key.pts) for key in message.keyframes),
        video_codec=message.video_codec,
        time_base=(message.time_base_num or 1, message.time_base_den or 1),
    )

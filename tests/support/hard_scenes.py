"""Hard cases for the identity tests, built from package-shipped portraits.

A 720p group scene places one person six times at different scales and positions, some of them cut
by the frame edge; a short clip pans it a few pixels a frame. Sources are cut down to a small square
around the face. The packages ship two portraits a judge can recognise (scikit-image's astronaut and
matplotlib's Grace Hopper; dlib finds no face in scikit-image's cameraman), so a scene holds one of
them and the other is the source: every face in the scene then has an original identity the source
must replace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import av
import cv2
import numpy as np

from services.cli import sample_media
from services.common.media_paths import temporary_path

Portrait = Literal["astronaut", "grace_hopper"]
PORTRAITS: tuple[Portrait, ...] = get_args(Portrait)

FRAME_SIZE = (1280, 720)  # (width, height)
SMALL_SOURCE_SIZE = 112
BACKDROP = (118, 128, 124)
# Face boxes (x0, y0, x1, y1) in the packaged photos, measured with dlib's frontal face detector.
FACE_BOXES: dict[Portrait, tuple[int, int, int, int]] = {
    "astronaut": (175, 76, 265, 166),
    "grace_hopper": (180, 139, 366, 325),
}
# How far a placed portrait reaches beyond its face box, in face widths: (left and right, up, down).
HEAD_MARGINS = (0.45, 0.55, 0.7)
# How far a small source reaches beyond the face box on each side, in face widths.
SOURCE_MARGIN = 0.3
# Pixels the clip's camera pans a frame, (x, y).
PAN_PER_FRAME = (3, 2)


@dataclass(frozen=True)
class Placement:
    """Where one copy of the portrait's face box lands in the frame; it may reach past the edge."""

    center: tuple[int, int]  # (x, y) of the face box's centre
    face_width: int
    mirrored: bool = False

    def face_box(self) -> tuple[int, int, int, int]:
        half = self.face_width // 2
        x, y = self.center
        return x - half, y - half, x - half + self.face_width, y - half + self.face_width

    def cut_by_edge(self, size: tuple[int, int] = FRAME_SIZE) -> bool:
        x0, y0, x1, y1 = self.face_box()
        return x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]


# Six people on a 1280x720 frame: faces from 120 to 190 px wide, three of them cut by an edge (left,
# right, bottom) by a fifth to a third of the face.
GROUP: tuple[Placement, ...] = (
    Placement(center=(30, 200), face_width=170),
    Placement(center=(420, 170), face_width=120, mirrored=True),
    Placement(center=(780, 190), face_width=150),
    Placement(center=(1230, 330), face_width=180, mirrored=True),
    Placement(center=(260, 560), face_width=140, mirrored=True),
    Placement(center=(760, 665), face_width=190),
)


def portrait_photo(portrait: Portrait) -> np.ndarray:
    return sample_media.astronaut_photo() if portrait == "astronaut" else sample_media.grace_hopper_photo()


def _head(portrait: Portrait, face_width: int, mirrored: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """The portrait's head and shoulders scaled to `face_width`, and the face box centre within it."""
    photo = portrait_photo(portrait)
    x0, y0, x1, y1 = FACE_BOXES[portrait]
    width = x1 - x0
    side, up, down = (round(margin * width) for margin in HEAD_MARGINS)
    left, top = max(x0 - side, 0), max(y0 - up, 0)
    right, bottom = min(x1 + side, photo.shape[1]), min(y1 + down, photo.shape[0])
    scale = face_width / width
    region = photo[top:bottom, left:right]
    head = cv2.resize(
        region,
        (round(region.shape[1] * scale), round(region.shape[0] * scale)),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
    )
    center_x = ((x0 + x1) / 2 - left) * scale
    center_y = ((y0 + y1) / 2 - top) * scale
    if mirrored:
        head, center_x = head[:, ::-1], head.shape[1] - center_x
    return head, (round(center_x), round(center_y))


def _paste(canvas: np.ndarray, image: np.ndarray, left: int, top: int) -> None:
    """Copies `image` onto `canvas` with its top-left corner at (left, top); what falls outside is dropped."""
    height, width = canvas.shape[:2]
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + image.shape[1], width), min(top + image.shape[0], height)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = image[y0 - top : y1 - top, x0 - left : x1 - left]


def group_clip_frames(
    portrait: Portrait,
    frame_count: int,
    placements: tuple[Placement, ...] = GROUP,
    size: tuple[int, int] = FRAME_SIZE,
) -> list[np.ndarray]:
    """(height, width, 3) uint8 RGB frames: the portrait at every placement on a flat backdrop, under a
    slow pan (frame i moved by i * PAN_PER_FRAME)."""
    width, height = size
    heads = [_head(portrait, placement.face_width, placement.mirrored) for placement in placements]
    frames = []
    for index in range(frame_count):
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = BACKDROP
        for placement, (head, (center_x, center_y)) in zip(placements, heads, strict=True):
            left = placement.center[0] + index * PAN_PER_FRAME[0] - center_x
            top = placement.center[1] + index * PAN_PER_FRAME[1] - center_y
            _paste(canvas, head, left, top)
        frames.append(canvas)
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    """An H.264 MP4 (yuv420p, near-lossless crf 12) of the RGB frames, written to a temporary name first."""
    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(path)
    try:
        with av.open(str(partial), "w", format="mp4") as container:
            stream = container.add_stream(
                "libx264",
                rate=fps,
                options={
                    "crf": "12",
                    "preset": "veryfast",
                    # As in sample_media: without mbtree=0 this libx264 build's output differs between runs.
                    "x264-params": "mbtree=0",
                },
            )
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            for index, picture in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def small_source(portrait: Portrait, size: int = SMALL_SOURCE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 RGB: a square around the portrait's face, SOURCE_MARGIN face widths each side."""
    photo = portrait_photo(portrait)
    x0, y0, x1, y1 = FACE_BOXES[portrait]
    pad = round(SOURCE_MARGIN * (x1 - x0))
    square = photo[max(y0 - pad, 0) : y1 + pad, max(x0 - pad, 0) : x1 + pad]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


def other_portrait(portrait: Portrait) -> Portrait:
    return next(other for other in PORTRAITS if other != portrait)

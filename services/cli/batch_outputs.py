"""Whether an output `swapline batch` finds on disk is complete: present is not enough.

A video output is complete when it opens and every packet reads, with the target's frame count and (within
a frame and a half) its duration; an image output when it decodes whole, at the target's size. Anything
else (truncated by a killed download, fewer frames, corrupt) is redone. Both sides are read with the
probe the decoder plans chunks with (services/common/media_probe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from services.common.errors import InvalidArgument
from services.common.media_info import MediaInfo
from services.common.media_probe import probe_media

# An output may end up to this many frame intervals off the target's duration (time bases are rounded).
DURATION_TOLERANCE_FRAMES = 1.5
# For a target that states no frame rate.
MIN_DURATION_TOLERANCE_SECONDS = 0.05


@dataclass(frozen=True)
class OutputCheck:
    """Whether an output is complete; `detail` says what it holds, or why it is not complete."""

    complete: bool
    detail: str
    frames: int = 0
    duration_seconds: float = 0.0


def probe_target(path: Path) -> MediaInfo | str:
    """The target's media info, or why it cannot be read here (its outputs are then never taken as complete)."""
    try:
        return probe_media(path)
    except InvalidArgument as error:
        return error.message


def duration_tolerance(target: MediaInfo) -> float:
    return max(DURATION_TOLERANCE_FRAMES / target.fps if target.fps > 0 else 0.0, MIN_DURATION_TOLERANCE_SECONDS)


def _check_image(output: Path, target: MediaInfo) -> OutputCheck:
    # OpenCV's decoders give nothing for a file that ends early (a JPEG without its end marker, say).
    image = cv2.imdecode(np.frombuffer(output.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        return OutputCheck(False, "the image is truncated or corrupt")
    height, width = image.shape[:2]
    if (width, height) != (target.width, target.height):
        return OutputCheck(False, f"the image is {width}x{height}; the target is {target.width}x{target.height}")
    return OutputCheck(True, f"{width}x{height} image", frames=1)


def _check_video(output: Path, target: MediaInfo) -> OutputCheck:
    try:
        info = probe_media(output)
    except InvalidArgument as error:
        return OutputCheck(False, error.message)
    if info.kind != "video":
        return OutputCheck(False, "it is an image; the target is a video")
    if info.frame_count != target.frame_count:
        return OutputCheck(False, f"it has {info.frame_count} frames; the target has {target.frame_count}")
    if abs(info.duration_seconds - target.duration_seconds) > duration_tolerance(target):
        return OutputCheck(
            False, f"it lasts {info.duration_seconds:.3f} s; the target lasts {target.duration_seconds:.3f} s"
        )
    return OutputCheck(
        True, f"{info.frame_count} frames, {info.duration_seconds:.2f} s", info.frame_count, info.duration_seconds
    )


def check_output(output: Path, target: MediaInfo | str) -> OutputCheck:
    """Complete only when `output` holds what a finished job makes of `target` (a probe, or why it failed)."""
    if not output.is_file():
        return OutputCheck(False, "missing")
    if output.stat().st_size == 0:
        return OutputCheck(False, "empty")
    if isinstance(target, str):
        return OutputCheck(False, f"the target cannot be read here to compare: {target}")
    return _check_image(output, target) if target.kind == "image" else _check_video(output, target)


def skip_reason(check: OutputCheck) -> str:
    return f"output exists and is complete: {check.detail}"


def remove_partial_files(output_dir: Path) -> list[Path]:
    """Hidden `.part` files a killed run left in the output directory (downloads it never renamed)."""
    removed = []
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".part") and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed

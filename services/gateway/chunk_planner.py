"""Splits a probed target into keyframe-aligned chunks that workers can decode independently."""

from __future__ import annotations

from pathlib import PurePosixPath

from services.common.media_info import Keyframe, MediaInfo, MediaKind
from services.gateway.job_records import PlannedChunk


def segment_uri(job_id: str, index: int, kind: MediaKind) -> str:
    """The chunk's planned segment name; each lease writes its own variant (attempt_segment_uri)."""
    extension = "png" if kind == "image" else "mp4"
    return f"work/{job_id}/chunk-{index:05d}.{extension}"


def attempt_segment_uri(planned_uri: str, attempt: int) -> str:
    """Where the `attempt`-th lease of a chunk has its segment written.

    A worker whose lease lapsed may still be writing; the next lease's segment has another name, so the
    stale writer never touches the segment the job is joined from.
    """
    path = PurePosixPath(planned_uri)
    return str(path.with_name(f"{path.stem}-a{attempt}{path.suffix}"))


def output_uri(job_id: str, kind: MediaKind) -> str:
    return f"outputs/{job_id}/output.{'png' if kind == 'image' else 'mp4'}"


def report_uri(job_id: str) -> str:
    return f"outputs/{job_id}/report.json"


def usable_keyframes(info: MediaInfo) -> list[Keyframe]:
    """Sorted keyframes inside the stream, always starting at frame 0.

    A probe that lists no keyframe at frame 0 still decodes from the stream start, which seeking to
    pts 0 reaches.
    """
    by_index = {kf.frame_index: kf for kf in info.keyframes if 0 <= kf.frame_index < info.frame_count}
    if 0 not in by_index:
        by_index[0] = Keyframe(frame_index=0, pts=0)
    return [by_index[index] for index in sorted(by_index)]


def plan_chunks(job_id: str, info: MediaInfo, chunk_seconds: float) -> list[PlannedChunk]:
    """Chunks start on keyframes and last at least chunk_seconds, except the last one."""
    if info.kind == "image":
        first_pts = info.keyframes[0].pts if info.keyframes else 0
        return [PlannedChunk(0, 0, first_pts, 1, segment_uri(job_id, 0, "image"))]
    if info.frame_count <= 0:
        return []
    min_frames = chunk_seconds * info.fps if info.fps > 0 else float("inf")
    starts: list[Keyframe] = []
    for keyframe in usable_keyframes(info):
        if not starts or keyframe.frame_index - starts[-1].frame_index >= min_frames:
            starts.append(keyframe)
    ends = [keyframe.frame_index for keyframe in starts[1:]] + [info.frame_count]
    return [
        PlannedChunk(
            index=index,
            start_frame=start.frame_index,
            seek_pts=start.pts,
            frame_count=end - start.frame_index,
            segment_uri=segment_uri(job_id, index, "video"),
        )
        for index, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]

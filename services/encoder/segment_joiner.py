"""Joins encoded segments into the output file by remuxing, and copies the original's audio.

The output is written under a temporary name beside it and renamed only once it is complete and its
frames are counted: a join that fails, is cancelled or is killed never leaves a file at the output path.
"""

from __future__ import annotations

import heapq
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from services.common.media_opener import PACKETS_ONLY, open_media, shown_name
from services.common.media_paths import temporary_path
from services.encoder.segment_writer import count_video_frames, is_image_path


@dataclass(frozen=True)
class JoinResult:
    frames: int
    audio_copied: bool
    seconds: float


@dataclass(frozen=True)
class _SegmentLayout:
    """What must agree between segments for their packets to form one valid stream."""

    codec: str
    width: int
    height: int
    extradata: bytes | None

    def difference(self, other: _SegmentLayout) -> str:
        mine, theirs = f"{self.codec} {self.width}x{self.height}", f"{other.codec} {other.width}x{other.height}"
        return f"{mine} vs {theirs}" if mine != theirs else "other encoder settings"


def _layout(stream: av.video.stream.VideoStream) -> _SegmentLayout:
    context = stream.codec_context
    return _SegmentLayout(context.name, context.width, context.height, context.extradata)


def _segment_packets(
    paths: Sequence[Path], output: av.container.OutputContainer, first: av.video.stream.VideoStream
) -> Iterator[tuple[Fraction, int, av.Packet]]:
    """Video packets of every segment in order, shifted so each segment starts where the last ended.

    Yields (decode time in seconds, order, packet) for merging with audio.
    """
    expected = _layout(first)
    target = output.streams.video[0]
    offset_seconds = Fraction(0)
    order = 0
    for path in paths:
        with open_media(path, PACKETS_ONLY) as container:
            if not container.streams.video:
                raise InvalidArgument(f"segment {shown_name(path)} has no video stream")
            stream = container.streams.video[0]
            if _layout(stream) != expected:
                raise InvalidArgument(
                    f"segment {shown_name(path)} was encoded differently from {shown_name(paths[0])} "
                    f"({_layout(stream).difference(expected)}); segments must share codec, size and settings"
                )
            time_base = stream.time_base
            if time_base is None:
                raise InvalidArgument(f"segment {shown_name(path)} has no video time base")
            packets = [packet for packet in container.demux(stream) if packet.size > 0]
            if not packets:
                raise InvalidArgument(f"segment {shown_name(path)} holds no frames")
            first_pts = min(packet.pts or 0 for packet in packets)
            # A container that leaves packet durations out still needs the last frame's length.
            rate = stream.average_rate or stream.guessed_rate
            frame_step = max(1, round(1 / (rate * time_base))) if rate else 1
            end_pts = max((packet.pts or 0) + (packet.duration or frame_step) for packet in packets)
            shift = round(offset_seconds / time_base) - first_pts
            for packet in packets:
                pts = packet.pts or 0
                dts = packet.dts if packet.dts is not None else pts
                packet.pts, packet.dts = pts + shift, dts + shift
                packet.stream = target
                yield Fraction(packet.dts) * time_base, order, packet
                order += 1
            offset_seconds += (end_pts - first_pts) * time_base


def _audio_packets(container: av.container.InputContainer) -> Iterator[tuple[Fraction, int, av.Packet]]:
    stream = container.streams.audio[0]
    time_base = stream.time_base or Fraction(1, stream.codec_context.sample_rate or 1)
    for order, packet in enumerate(container.demux(stream)):
        if packet.size == 0:
            continue
        stamp = packet.dts if packet.dts is not None else packet.pts or 0
        yield Fraction(stamp) * time_base, order, packet


def join_segments(
    segment_paths: Sequence[Path],
    output_path: Path,
    audio_source: Path | None,
    expected_frames: int = 0,
    cancelled: threading.Event | None = None,
) -> JoinResult:
    """Remuxes the segments' video, in order and without re-encoding, into one MP4 at output_path.

    Timestamps continue across segments. The first audio stream of audio_source, when it has one,
    is stream-copied unchanged. A single image segment is copied to output_path as it is.
    The output must hold expected_frames frames when that is above 0 (FailedPrecondition otherwise).
    Setting `cancelled` stops the join (Cancelled) at the next packet or before the rename.
    """
    started = time.perf_counter()
    if not segment_paths:
        raise InvalidArgument("join needs at least one segment")
    stop = cancelled if cancelled is not None else threading.Event()
    temporary = temporary_path(output_path)
    try:
        if any(is_image_path(path) for path in segment_paths):
            if len(segment_paths) != 1:
                raise InvalidArgument(f"an image output takes one segment, got {len(segment_paths)}")
            shutil.copyfile(segment_paths[0], temporary)
            frames, has_audio = 1, False
        else:
            has_audio = _remux(segment_paths, temporary, audio_source, stop)
            frames = count_video_frames(temporary)
        if expected_frames and frames != expected_frames:
            raise FailedPrecondition(
                f"the joined output holds {frames} frames, expected {expected_frames}; it was not kept"
            )
        if stop.is_set():
            raise Cancelled("the join was cancelled")
        os.replace(temporary, output_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return JoinResult(frames=frames, audio_copied=has_audio, seconds=time.perf_counter() - started)


def _remux(segment_paths: Sequence[Path], output_path: Path, audio_source: Path | None, stop: threading.Event) -> bool:
    """Writes the joined MP4 to output_path; returns whether audio was copied."""
    audio_container = open_media(audio_source, PACKETS_ONLY) if audio_source is not None else None
    try:
        has_audio = audio_container is not None and bool(audio_container.streams.audio)
        with open_media(segment_paths[0], PACKETS_ONLY) as first_segment:
            if not first_segment.streams.video:
                raise InvalidArgument(f"segment {shown_name(segment_paths[0])} has no video stream")
            template = first_segment.streams.video[0]
            try:
                with av.open(str(output_path), "w", format="mp4") as output:
                    output.add_stream_from_template(template)
                    sources = [_segment_packets(segment_paths, output, template)]
                    if has_audio and audio_container is not None:
                        audio_target = output.add_stream_from_template(audio_container.streams.audio[0])
                        sources.append(_tagged(_audio_packets(audio_container), audio_target))
                    # Merged by decode time so the muxer never has to buffer one stream whole.
                    for _stamp, _order, packet in heapq.merge(*sources, key=lambda item: item[:2]):
                        if stop.is_set():
                            raise Cancelled("the join was cancelled")
                        output.mux(packet)
            except av.error.FFmpegError as error:
                raise InvalidArgument(f"joining segments failed: {error.strerror}") from None
    finally:
        if audio_container is not None:
            audio_container.close()
    return has_audio


def _tagged(
    packets: Iterator[tuple[Fraction, int, av.Packet]], target: av.stream.Stream
) -> Iterator[tuple[Fraction, int, av.Packet]]:
    for stamp, order, packet in packets:
        packet.stream = target
        yield stamp, order, packet

"""Segments encoded on NVENC through PyNvVideoCodec, muxed into MP4 by PyAV; SegmentWriter's contract unchanged.

Written to PyNvVideoCodec 2.2's documented encoder API: CreateEncoder(width, height, format, usecpuinputbuffer,
**options) opens a session; Encode(frame) takes one host frame and returns the H.264 (Annex B) bytes ready so
far, which may be none or several frames; EndEncode() flushes the rest. Frames go in as NV12 from host memory,
converted on the CPU the way the libx264 path converts them (BT.601, limited range), so both backends give
the same colours.

H100 and H200 have no NVENC; this path runs where the start-up probe (encode_backend) opened a session.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np
from numpy.typing import NDArray

from services.common.encode_options import MAX_FRAME_PIXELS, X264Preset
from services.common.errors import InvalidArgument, Unavailable
from services.common.frames.pixel_formats import rgb_to_nv12
from services.common.media_opener import shown_name
from services.encoder.segment_writer import SegmentWriter, VideoTrack, is_image_path

NVENC_MODULE = "PyNvVideoCodec"
# NVENC's H.264 encoder takes frames up to 4096 on each side.
NVENC_H264_MAX_SIDE = 4096
# x264's presets onto NVENC's P1 (fastest) .. P7 (slowest, best), in the same speed order.
NVENC_PRESETS: dict[X264Preset, str] = {
    "ultrafast": "P1",
    "superfast": "P2",
    "veryfast": "P3",
    "faster": "P3",
    "fast": "P4",
    "medium": "P4",
    "slow": "P5",
    "slower": "P6",
    "veryslow": "P7",
    "placebo": "P7",
}
# x264's default keyframe interval, so both backends place keyframes alike.
KEYFRAME_INTERVAL = 250


class NvencSession(Protocol):
    def Encode(self, frame: NDArray[np.uint8]) -> bytes: ...

    def EndEncode(self) -> bytes: ...


class NvencModule(Protocol):
    def CreateEncoder(
        self, width: int, height: int, fmt: str, usecpuinputbuffer: bool, **options: str
    ) -> NvencSession: ...


def nvenc_quality(crf: int) -> int:
    """NVENC's constant-quality target (cq) for an x264 crf.

    Both name a quantiser on H.264's 0..51 scale and let the bitrate follow the picture (NVENC: rate control
    vbr with cq and no bitrate set, so no cap), so the number carries over: lower is better, and about six
    steps double the bitrate on either encoder. Equal numbers are not equal quality across encoders; matching
    them would take measurements on a GPU with NVENC, which the H200 is not. cq 0 means "NVENC picks", not
    lossless, so crf 0 becomes cq 1, NVENC's best.
    """
    return max(1, crf)


def nvenc_options(rate: Fraction, crf: int, preset: X264Preset) -> dict[str, str]:
    """CreateEncoder's options for a segment (PyNvVideoCodec reads every option as a string)."""
    return {
        "codec": "h264",
        "preset": NVENC_PRESETS[preset],
        "tuning_info": "high_quality",
        "rc": "vbr",
        "cq": str(nvenc_quality(crf)),
        "fps": str(float(rate)),
        # No B-frames: packets then come out in display order, and packet i is frame i (pts = dts = i).
        "bf": "0",
        "gop": str(KEYFRAME_INTERVAL),
        "idrperiod": str(KEYFRAME_INTERVAL),
        # SPS and PPS before every IDR, so the first packet always carries what the MP4 header is built from.
        "repeatspspps": "1",
    }


def open_session(
    nvenc: NvencModule, width: int, height: int, rate: Fraction, crf: int, preset: X264Preset
) -> NvencSession:
    return nvenc.CreateEncoder(width, height, "NV12", True, **nvenc_options(rate, crf, preset))


class NvencTrack:
    """An NVENC session feeding an MP4 stream; its bitstream is cut into frames by FFmpeg's H.264 parser."""

    def __init__(self, path: Path, rate: Fraction, width: int, height: int, session: NvencSession) -> None:
        self._session = session
        self._time_base = 1 / rate
        self._container = av.open(str(path), "w", format="mp4")
        self._stream = self._container.add_mux_stream("h264", rate=rate, width=width, height=height)
        self._stream.time_base = self._time_base
        self._parser = av.CodecContext.create("h264", "r")
        self._muxed = 0

    def add(self, frame: NDArray[np.uint8], index: int) -> None:
        # NVENC takes NV12 from host memory as one flat array.
        nv12 = frame if frame.ndim == 2 else rgb_to_nv12(frame)
        self._mux(self._session.Encode(nv12.reshape(-1)))

    def _mux(self, bitstream: bytes | None) -> None:
        """Muxes the whole frames in `bitstream`; None flushes the parser's last frame."""
        if bitstream is not None and not bitstream:
            return
        for packet in self._parser.parse(bitstream):
            packet.pts = packet.dts = self._muxed
            packet.duration = 1
            packet.time_base = self._time_base
            packet.stream = self._stream
            self._container.mux(packet)
            self._muxed += 1

    def finish(self) -> None:
        try:
            self._mux(self._session.EndEncode())
            self._mux(None)
        finally:
            self._container.close()

    def abandon(self) -> None:
        self._container.close()


class NvencSegmentWriter(SegmentWriter):
    """SegmentWriter on NVENC: the same checks, temporary name, frame count on close and rename.

    A still image (.png, .jpg) is still written by cv2, as SegmentWriter writes it.
    """

    def __init__(
        self,
        path: Path,
        fps: float,
        width: int,
        height: int,
        crf: int,
        preset: str,
        nvenc: NvencModule,
        max_pixels: int = MAX_FRAME_PIXELS,
    ) -> None:
        super().__init__(path, fps, width, height, crf, preset, max_pixels=max_pixels)
        if not is_image_path(path) and max(width, height) > NVENC_H264_MAX_SIDE:
            raise InvalidArgument(
                f"{shown_name(path)}: NVENC encodes H.264 up to {NVENC_H264_MAX_SIDE} pixels a side, "
                f"got {width}x{height}"
            )
        self._nvenc = nvenc

    def _open_track(self) -> VideoTrack:
        try:
            session = open_session(self._nvenc, self.width, self.height, self._rate, self._crf, self._preset)
        except Exception as error:  # PyNvVideoCodec raises its own classes; any failure here means no session
            raise Unavailable(
                f"NVENC could not open an H.264 session for {shown_name(self.path)}: {type(error).__name__}: {error}"
            ) from None
        return NvencTrack(self._temporary, self._rate, self.width, self.height, session)

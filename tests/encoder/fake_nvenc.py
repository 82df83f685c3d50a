"""A stand-in for PyNvVideoCodec's encoder on a CPU: the documented calls, with libx264 doing the encoding.

Like an NVENC session from host memory, a session takes flat NV12 frames and returns Annex B H.264 bytes:
nothing for the first frames (libx264 holds them back, as NVENC's pipeline does), several frames at once
later, and the rest from EndEncode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
from numpy.typing import NDArray


class X264Session:
    def __init__(self, width: int, height: int, options: dict[str, str]) -> None:
        self.width, self.height = width, height
        context = av.CodecContext.create("libx264", "w")
        context.width, context.height, context.pix_fmt = width, height, "nv12"
        context.time_base = Fraction(1, 25)
        context.gop_size = int(options["gop"])
        context.options = {"bf": options["bf"], "crf": options["cq"], "preset": "veryfast"}
        context.open()
        self._context = context
        self._frames = 0
        self.returned: list[int] = []

    def _bytes(self, packets: list[av.Packet]) -> bytes:
        self.returned.append(len(packets))
        return b"".join(bytes(packet) for packet in packets)

    def Encode(self, frame: NDArray[np.uint8]) -> bytes:
        assert frame.ndim == 1 and frame.dtype == np.uint8, "host frames go in as one flat array"
        assert frame.size == self.width * self.height * 3 // 2, "an NV12 frame is 1.5 bytes a pixel"
        picture = av.VideoFrame.from_ndarray(frame.reshape(self.height * 3 // 2, self.width), format="nv12")
        picture.pts = self._frames
        self._frames += 1
        return self._bytes(list(self._context.encode(picture)))

    def EndEncode(self) -> bytes:
        return self._bytes(list(self._context.encode(None)))


@dataclass
class FakeNvenc:
    """CreateEncoder as PyNvVideoCodec has it; `failure`, when set, is raised instead of opening a session."""

    failure: Exception | None = None
    created: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[X264Session] = field(default_factory=list)

    def CreateEncoder(self, width: int, height: int, fmt: str, usecpuinputbuffer: bool, **options: str) -> X264Session:
        self.created.append(
            {"width": width, "height": height, "fmt": fmt, "usecpuinputbuffer": usecpuinputbuffer, **options}
        )
        if self.failure is not None:
            raise self.failure
        session = X264Session(width, height, options)
        self.sessions.append(session)
        return session

"""Where a chunk's NVDEC time goes: opening a session, seeking, decoding to host RGB or NV12, and how decoding
threads of one process scale.

Run as `python -m services.bench.nvdec_profile --out nvdec.json` on a GPU machine with PyNvVideoCodec. The
decoder service opens one SimpleDecoder a request (a chunk of 25 frames of the 20 s 1080p bench clip), so the
session's opening cost is paid once a chunk; this measures it against the frames it decodes, what a reused
session (`reconfigure_decoder`) costs instead, what NV12 output saves against RGB, and whether threads of one
process decode at once (the library releasing the GIL) or one after another. Last, it checks the decoder
service's reader (frames left in GPU memory and copied out by cuda_copier) against PyAV's NV12 frames and the
library's own host-memory RGB frames, which must be equal byte for byte, and times it. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.bench.gpu_bench import CLIPS, prepare_media, write_json
from services.common.frames.pixel_formats import PixelFormat
from services.common.media_probe import probe_media
from services.decoder.frame_reader import iter_frame_batches
from services.decoder.nvdec_reader import iter_nvdec_frame_batches

CHUNK_FRAMES = 25
CLIP_SECONDS = 20.0
THREAD_COUNTS = (1, 2, 4, 8)
OutputColour = str  # "RGB" or "NATIVE": PyNvVideoCodec's OutputColorType member names


def _open(path: Path, colour: OutputColour) -> Any:
    nvc = importlib.import_module("PyNvVideoCodec")
    return nvc.SimpleDecoder(
        str(path), gpu_id=0, use_device_memory=False, output_color_type=getattr(nvc.OutputColorType, colour)
    )


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - started) * 1000.0


def chunk_phases(path: Path, colour: OutputColour, start: int) -> dict[str, float]:
    """Milliseconds of each step the decoder service takes for one chunk, with a new session."""
    decoder, open_ms = _timed(lambda: _open(path, colour))
    _, length_ms = _timed(lambda: len(decoder))
    _, seek_ms = _timed(lambda: decoder.seek_to_index(start))
    frames, decode_ms = _timed(lambda: decoder.get_batch_frames(CHUNK_FRAMES))
    return {
        "open_ms": open_ms,
        "len_ms": length_ms,
        "seek_ms": seek_ms,
        "decode_ms": decode_ms,
        "frames": len(frames),
        "frame_bytes": frames[0].framesize() if frames else 0,
    }


def reused_chunks(path: Path, colour: OutputColour, starts: list[int]) -> dict[str, float]:
    """One session pointed at the file again for each chunk (reconfigure_decoder), as a pool would."""
    decoder = _open(path, colour)
    reconfigure = seek = decode = 0.0
    for start in starts:
        _, spent = _timed(lambda: decoder.reconfigure_decoder(str(path)))
        reconfigure += spent
        _, spent = _timed(lambda: decoder.seek_to_index(start))  # noqa: B023 (called at once)
        seek += spent
        _, spent = _timed(lambda: decoder.get_batch_frames(CHUNK_FRAMES))
        decode += spent
    count = len(starts)
    return {"reconfigure_ms": reconfigure / count, "seek_ms": seek / count, "decode_ms": decode / count}


def threaded_fps(
    path: Path, colour: OutputColour, threads: int, chunks_each: int, frame_count: int
) -> dict[str, float]:
    """Frames a second when `threads` threads each decode `chunks_each` chunks, a new session a chunk."""
    last_chunk = frame_count // CHUNK_FRAMES - 1

    def work(offset: int) -> None:
        for chunk in range(chunks_each):
            start = ((offset * chunks_each + chunk) % last_chunk) * CHUNK_FRAMES
            decoder = _open(path, colour)
            decoder.seek_to_index(start)
            decoder.get_batch_frames(CHUNK_FRAMES)

    workers = [threading.Thread(target=work, args=(offset,)) for offset in range(threads)]
    cpu_before, started = os.times(), time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    frames = threads * chunks_each * CHUNK_FRAMES
    return {"threads": threads, "fps": frames / wall, "cores_busy": cpu / wall, "cpu_ms_a_frame": cpu * 1000 / frames}


def _host_rgb_frames(path: Path, start: int) -> np.ndarray:
    """The library's RGB frames of one chunk in its own host memory, copied out as the reader once did."""
    decoder = _open(path, "RGB")
    decoder.seek_to_index(start)
    frames = decoder.get_batch_frames(CHUNK_FRAMES)
    return np.stack(
        [
            np.ctypeslib.as_array(
                ctypes.cast(frame.GetPtrToPlane(0), ctypes.POINTER(ctypes.c_uint8)), shape=(frame.framesize(),)
            ).copy()
            for frame in frames
        ]
    )


def reader_parity(path: Path, starts: list[int]) -> dict[str, Any]:
    """The reader's frames against PyAV's NV12 and the library's host RGB, and its CPU a frame, per layout."""
    keyframes = {keyframe.frame_index: keyframe.pts for keyframe in probe_media(path).keyframes}
    record: dict[str, Any] = {}
    layouts: tuple[PixelFormat, ...] = ("nv12", "rgb24")
    for pixel_format in layouts:
        equal, cpu_seconds, frames = True, 0.0, 0
        for start in starts:
            cpu_before = time.process_time()
            batches = list(
                iter_nvdec_frame_batches(path, start, keyframes[start], CHUNK_FRAMES, 8, pixel_format=pixel_format)
            )
            cpu_seconds += time.process_time() - cpu_before
            decoded = np.concatenate([batch for batch, _, _ in batches])
            frames += len(decoded)
            if pixel_format == "nv12":
                reference = np.concatenate(
                    [
                        batch
                        for batch, _, _ in iter_frame_batches(
                            path, start, keyframes[start], CHUNK_FRAMES, 8, pixel_format="nv12"
                        )
                    ]
                )
            else:
                reference = _host_rgb_frames(path, start).reshape(decoded.shape)
            equal = equal and bool(np.array_equal(decoded, reference))
        record[pixel_format] = {"equal": equal, "frames": frames, "cpu_ms_a_frame": cpu_seconds * 1000 / frames}
    return record


def profile(media: Path) -> dict[str, Any]:
    path = prepare_media(media, CLIP_SECONDS, CLIPS[:1])[CLIPS[0].name]
    frame_count = int(CLIP_SECONDS * 25)
    starts = [chunk * CHUNK_FRAMES for chunk in range(2, 10)]
    record: dict[str, Any] = {"clip": path.name}
    for colour in ("RGB", "NATIVE"):
        chunk_phases(path, colour, 0)  # the first session in a process also loads the driver's libraries
        phases = [chunk_phases(path, colour, start) for start in starts]
        record[colour] = {
            "new_session_a_chunk": {key: sum(p[key] for p in phases) / len(phases) for key in phases[0]},
            "reused_session": reused_chunks(path, colour, starts),
            "threads": [threaded_fps(path, colour, count, 4, frame_count) for count in THREAD_COUNTS],
        }
    record["reader"] = reader_parity(path, starts)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--media", type=Path, default=Path("build/gpu-media"))
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args(argv)
    record = profile(arguments.media)
    print(json.dumps(record, indent=2))
    write_json(arguments.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

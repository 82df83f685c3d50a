"""One chunk through decode -> detect -> swap -> paste back -> encode, the stages overlapped.

Each stage is an asyncio task; bounded queues (STAGE_QUEUE_SIZE batches) join them, so while
batch k is detected, batch k+1 is decoded, batch k-1 is swapped and earlier batches are pasted and
encoded, and memory stays bounded by a few batches. CPU-heavy numpy, OpenCV and torch work
(alignment, paste back, descriptors) runs in threads: all three release the GIL, so it overlaps the
gRPC and Triton waits of the other stages. The pipeline is written against small Protocols so the
same code runs with gRPC stage clients in the worker and with in-process models in the benchmark.

Where faces are cut out and pasted back is a FaceWarper's business: OpenCV on the host by default,
or torch on a GPU (batch_warp.TorchFaceWarper), where a batch's frames go up when they are shrunk for
detection and stay there until its faces are pasted, and its crops stay there for the swapper.

Frames yielded by the source belong to the pipeline: faces are pasted into them in place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.common.errors import Internal
from services.common.face_geometry import CropLayout
from services.common.face_types import DetectedFace
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import PixelFormat
from services.common.job_vocabulary import STAGE_NAMES, StageName
from services.worker.face_aligner import Cv2FaceWarper, alignment_matrix
from services.worker.face_selector import FaceSelection, select_batch
from services.worker.face_swapper import CropCodec, FaceSwapper, SourceIdentity

STAGE_QUEUE_SIZE = 2
# The default warper: stateless, so every pipeline shares it.
HOST_WARPER = Cv2FaceWarper()


class FrameSource(Protocol):
    """Batches of (frames in one pixel format (pixel_formats: RGB or NV12), their frame indices), in order."""

    def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]: ...


class FaceFinder(Protocol):
    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        """Every face of every frame, in the frames' own pixels."""
        ...


class AlignedFaces(Protocol):
    """A batch's faces cut out by a FaceWarper, waiting for their swapped crops."""

    @property
    def crops(self) -> Any:
        """(m, S, S, 3) uint8 RGB, where the warper's crop_codec keeps crops, for the swapper."""
        ...

    def paste(self, swapped: Any, masks: Any) -> Frames:
        """The batch's frames on the host with the swapped crops ((m, S, S, 3) uint8, masks (m, S, S) float32,
        as the crop_codec gives them) blended in, faces of one frame in order. May reuse the frames given to
        `align`."""
        ...


class FaceWarper(Protocol):
    @property
    def pixel_format(self) -> PixelFormat:
        """The layout it would rather have frames in; it takes RGB whatever this says."""
        ...

    @property
    def crop_codec(self) -> CropCodec:
        """Where crops live between `align` and `paste`; the swapper converts them there."""
        ...

    def shrink(self, frames: Frames, size: tuple[int, int]) -> Frames:
        """The frames resized to (width, height) as RGB on the host, for detection. A warper that works on a device
        may keep the frames it uploaded for this until they are aligned."""
        ...

    def align(self, frames: Frames, slots: Sequence[int], matrices: np.ndarray, size: int) -> AlignedFaces:
        """Face i cut from frames[slots[i]] by matrices[i] ((m, 2, 3) frame -> crop) into a size x size crop."""
        ...


class SegmentSink(Protocol):
    async def write(self, frames: Frames) -> None: ...

    async def close(self) -> int:
        """Finishes the segment; returns the number of frames it holds."""
        ...


def _zero_stage_seconds() -> dict[str, float]:
    return dict.fromkeys(STAGE_NAMES, 0.0)


@dataclass
class ChunkStats:
    """What a chunk run did; filled while it runs, so a heartbeat can read progress from it."""

    # Frames written to the sink; at the end, the count the encoder answered it holds (the run fails
    # if the two differ).
    frames: int = 0
    faces: int = 0  # faces swapped
    frames_with_faces: int = 0
    stage_seconds: dict[str, float] = field(default_factory=_zero_stage_seconds)
    # (frame index, faces swapped) for the chunk's first frame and each frame whose count differs
    # from the frame before; the first frame is always listed because the frame before it belongs
    # to another chunk, and the gateway drops repeats where chunks meet.
    face_count_changes: list[tuple[int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    skipped_faces: int = 0  # faces whose landmarks no similarity transform fits
    fp32_fallbacks: int = 0  # swapper and detector requests run again on an FP32 twin after an FP16 overflow
    # Set once the last frame is handed to the sink. What is left is the encoder flushing its
    # lookahead (a few hundred ms of libx264 at 720p), which the worker overlaps with its next chunk.
    frames_sent: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def busiest_stage(self) -> StageName:
        """The stage that has taken the most time so far: the chunk's bottleneck."""
        return max(STAGE_NAMES, key=lambda stage: self.stage_seconds.get(stage, 0.0))

    def record_frame(self, frame_index: int, faces: int) -> None:
        previous = self.face_count_changes[-1][1] if self.face_count_changes else None
        if previous is None or faces != previous:
            self.face_count_changes.append((int(frame_index), faces))
        self.frames += 1
        self.faces += faces
        if faces:
            self.frames_with_faces += 1


@dataclass(frozen=True)
class _DecodedBatch:
    frames: Frames
    indices: list[int]


@dataclass(frozen=True)
class _SelectedBatch:
    frames: Frames
    indices: list[int]
    faces: list[list[DetectedFace]]


@dataclass(frozen=True)
class _SwappedBatch:
    indices: list[int]
    slots: list[int]  # per swapped face, the slot of its frame in the batch
    aligned: AlignedFaces
    crops: Any
    masks: Any
    skipped: int


@dataclass(frozen=True)
class _PastedBatch:
    frames: Frames
    indices: list[int]
    faces_per_frame: list[int]


class _StageClock:
    def __init__(self, stats: ChunkStats) -> None:
        self._stats = stats

    @contextmanager
    def timing(self, stage: StageName) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._stats.stage_seconds[stage] = self._stats.stage_seconds.get(stage, 0.0) + (
                time.perf_counter() - started
            )


def _align_all(
    warper: FaceWarper, frames: Frames, faces: list[list[DetectedFace]], layout: CropLayout
) -> tuple[list[int], AlignedFaces, int]:
    """(slot of each aligned face, the faces cut out, faces skipped because no alignment fits them)."""
    slots: list[int] = []
    matrices: list[np.ndarray] = []
    skipped = 0
    for slot, frame_faces in enumerate(faces):
        for face in frame_faces:
            try:
                matrices.append(alignment_matrix(face.landmarks, layout.size, layout.template))
            except ValueError:
                skipped += 1
                continue
            slots.append(slot)
    stacked = np.stack(matrices) if matrices else np.zeros((0, 2, 3), np.float32)
    return slots, warper.align(frames, slots, stacked, layout.size), skipped


def _paste_all(batch: _SwappedBatch) -> tuple[Frames, list[int]]:
    frames = batch.aligned.paste(batch.crops, batch.masks)
    faces_per_frame = [0] * len(batch.indices)
    for slot in batch.slots:
        faces_per_frame[slot] += 1
    return frames, faces_per_frame


async def run_chunk_pipeline(
    source: FrameSource,
    finder: FaceFinder,
    swapper: FaceSwapper,
    identity: SourceIdentity,
    sink: SegmentSink,
    selection: FaceSelection,
    stats: ChunkStats | None = None,
    warper: FaceWarper = HOST_WARPER,
) -> ChunkStats:
    """Runs every stage to the end; the first stage error cancels the others and is raised as is.

    Pass `stats` to watch progress while it runs. The sink is closed only on success; on an error
    or cancellation the caller discards the segment.
    """
    live = stats if stats is not None else ChunkStats()
    live.started_at = time.time()
    clock = _StageClock(live)
    decoded: asyncio.Queue[_DecodedBatch | None] = asyncio.Queue(STAGE_QUEUE_SIZE)
    selected: asyncio.Queue[_SelectedBatch | None] = asyncio.Queue(STAGE_QUEUE_SIZE)
    swapped: asyncio.Queue[_SwappedBatch | None] = asyncio.Queue(STAGE_QUEUE_SIZE)
    pasted: asyncio.Queue[_PastedBatch | None] = asyncio.Queue(STAGE_QUEUE_SIZE)

    async def decode() -> None:
        batches = aiter(source)
        while True:
            with clock.timing("decode"):
                try:
                    frames, indices = await anext(batches)
                except StopAsyncIteration:
                    break
            if len(indices) != len(frames):
                raise Internal(f"frame source gave {len(frames)} frames with {len(indices)} indices")
            await decoded.put(_DecodedBatch(frames, [int(index) for index in indices]))
        await decoded.put(None)

    async def detect() -> None:
        while (batch := await decoded.get()) is not None:
            with clock.timing("detect"):
                found = await finder.detect(batch.frames) if len(batch.frames) else []
                if len(found) != len(batch.frames):
                    raise Internal(f"face finder answered {len(found)} frames for {len(batch.frames)}")
                chosen = await select_batch(batch.frames, found, selection)
            await selected.put(_SelectedBatch(batch.frames, batch.indices, chosen))
        await selected.put(None)

    async def swap() -> None:
        while (batch := await selected.get()) is not None:
            with clock.timing("swap"):
                slots, aligned, skipped = await asyncio.to_thread(
                    _align_all, warper, batch.frames, batch.faces, swapper.target_layout
                )
                crops = aligned.crops
                if len(crops):
                    swapped_faces = await swapper.swap(crops, identity)
                    new_crops, masks = swapped_faces.crops, swapped_faces.masks
                    live.fp32_fallbacks += swapped_faces.fp32_fallbacks
                else:
                    new_crops, masks = crops, np.zeros(crops.shape[:3], np.float32)
            await swapped.put(_SwappedBatch(batch.indices, slots, aligned, new_crops, masks, skipped))
        await swapped.put(None)

    async def paste() -> None:
        while (batch := await swapped.get()) is not None:
            with clock.timing("paste"):
                frames, faces_per_frame = await asyncio.to_thread(_paste_all, batch)
            live.skipped_faces += batch.skipped
            await pasted.put(_PastedBatch(frames, batch.indices, faces_per_frame))
        await pasted.put(None)

    async def encode() -> None:
        while (batch := await pasted.get()) is not None:
            with clock.timing("encode"):
                await sink.write(batch.frames)
            for index, faces in zip(batch.indices, batch.faces_per_frame, strict=True):
                live.record_frame(index, faces)
        live.frames_sent.set()
        with clock.timing("encode"):
            written = await sink.close()
        if written != live.frames:
            raise Internal(f"the segment holds {written} frames but {live.frames} were sent")

    tasks = [
        asyncio.create_task(stage(), name=f"chunk-{stage.__name__}") for stage in (decode, detect, swap, paste, encode)
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task in done and not task.cancelled() and (error := task.exception()) is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    live.finished_at = time.time()
    live.warnings.extend(chunk_warnings(live))
    return live


def chunk_warnings(stats: ChunkStats) -> list[str]:
    warnings = []
    if stats.frames and not stats.frames_with_faces:
        warnings.append(f"no face was selected in any of the {stats.frames} frames")
    if stats.skipped_faces:
        warnings.append(f"{stats.skipped_faces} faces were skipped: their landmarks fit no alignment")
    return warnings

"""glibc malloc settings for processes that stream video frames.

glibc serves blocks above its mmap threshold with a fresh mapping and unmaps them on free, and gives
the heap top back to the kernel once more than the trim threshold lies free there. A 720p RGB frame
(2.7 MiB) is such a block, and every hop makes several of them per frame (the numpy array, the
protobuf field, the serialised message, gRPC's copy), so each costs a page fault and a zeroed page per
4 KiB: packing and serialising one frame took 4.1 ms, against 0.8 ms with the blocks kept on the heap
and reused (`make bench` notes in docs/benchmarks.md). The price is resident memory that stays at its
high-water mark (a few frame batches per stream) instead of shrinking between messages, so only the
processes that move frames (decoder, detector, encoder, worker) apply them, at start.

The gateway wants the opposite: it holds images and uploads only while a job is submitted, and glibc's
default raises the mmap threshold each time such a block is freed, so after a burst of submissions the
same blocks came from the heap and a fragmented heap kept 130-180 MB that no job used any more.
`return_large_blocks` fixes the threshold low, so large blocks always go back to the kernel on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# Large enough for one 4K RGB frame (24.9 MB), so frames of every supported size come from the heap.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Freed heap memory up to this much stays with the process for the next frames.
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

# Blocks from this size up are mapped and unmapped on their own (glibc's initial default, kept fixed).
RETURNED_BLOCK_BYTES = 128 * 1024

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """False where the C library is not glibc or refuses (nothing changes)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    libc = ctypes.CDLL(library)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))


def keep_frame_buffers() -> bool:
    """Applies the frame settings to this process; False where the C library is not glibc (nothing changes)."""
    applied = _set_malloc_thresholds(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES)
    if not applied:
        log.warning("the C library refused the frame-buffer malloc settings; frames will use fresh pages")
    return applied


def return_large_blocks() -> bool:
    """Large blocks are unmapped when freed and a free heap top is trimmed: memory goes back after a burst."""
    return _set_malloc_thresholds(RETURNED_BLOCK_BYTES, RETURNED_BLOCK_BYTES)

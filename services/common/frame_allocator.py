"""glibc malloc settings for processes that stream video frames.

glibc serves blocks above its mmap threshold with a fresh mapping and unmaps them on free, and gives
the heap top back to the kernel once more than the trim threshold lies free there. A 720p RGB frame
(2.7 MiB) is such a block, and every hop makes several of them per frame (the numpy array, the
protobuf field, the serialised message, gRPC's copy), so each costs a page fault and a zeroed page per
4 KiB: packing and serialising one frame took 4.1 ms, against 0.8 ms with the blocks kept on the heap
and reused (`make bench` notes in docs/benchmarks.md). The price is resident memory that stays at its
high-water mark (a few frame batches per stream) instead of shrinking between messages, so only the
processes that move frames (decoder, detector, encoder, worker) apply them, at start.
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

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_frame_buffers() -> bool:
    """Applies the settings to this process; False where the C library is not glibc (nothing changes)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    libc = ctypes.CDLL(library)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not applied:
        log.warning("the C library refused the frame-buffer malloc settings; frames will use fresh pages")
    return applied

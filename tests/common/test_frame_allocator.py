"""keep_frame_buffers: frame-sized blocks come from the reusable heap instead of their own mappings."""

from __future__ import annotations

import subprocess
import sys

from services.common.frames.frame_allocator import MMAP_THRESHOLD_BYTES

# Run in a child process: the settings are process-wide and cannot be undone.
_COUNT_MAPPED_BLOCKS = """
import ctypes, sys
from services.common.frames.frame_allocator import keep_frame_buffers, return_large_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_blocks_while_holding_a_frame():
    before = libc.mallinfo2().hblks
    frame = bytearray(1280 * 720 * 3)
    during = libc.mallinfo2().hblks
    del frame
    return during - before

if sys.argv[1] == "tuned":
    assert keep_frame_buffers()
if sys.argv[1] == "returning":
    assert return_large_blocks()
if sys.argv[1] in ("after-a-free", "returning"):
    # Freeing a mapped block raises glibc's default threshold past its size.
    scratch = bytearray(1280 * 720 * 3)
    del scratch
print(mapped_blocks_while_holding_a_frame())
"""


def _mapped_blocks(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _COUNT_MAPPED_BLOCKS, mode], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip())


def test_a_frame_gets_its_own_mapping_by_default() -> None:
    assert _mapped_blocks("default") == 1


def test_a_frame_comes_from_the_heap_after_keep_frame_buffers() -> None:
    assert _mapped_blocks("tuned") == 0


def test_the_threshold_covers_a_4k_rgb_frame() -> None:
    assert MMAP_THRESHOLD_BYTES > 3840 * 2160 * 3


def test_by_default_a_freed_block_moves_the_next_ones_onto_the_heap() -> None:
    assert _mapped_blocks("after-a-free") == 0


def test_after_return_large_blocks_every_large_block_is_mapped_and_given_back() -> None:
    assert _mapped_blocks("returning") == 1

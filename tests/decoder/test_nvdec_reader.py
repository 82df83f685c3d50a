"""The NVDEC reader's contract, run on the CPU against a SimpleDecoder stand-in serving PyAV's frames."""

from __future__ import annotations

import os
import shutil
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from services.cli import sample_media
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.input_limits import DEFAULT_INPUT_LIMITS, InputLimits
from services.common.media_probe import probe_media
from services.decoder import nvdec_reader
from services.decoder.frame_reader import iter_frame_batches
from services.decoder.nvdec_reader import (
    SHIFTS,
    DecoderPool,
    NvdecDecodeError,
    NvdecOpenError,
    NvdecUnsupported,
    StreamHeader,
    forget_files,
    iter_nvdec_frame_batches,
    nvdec_refusal,
    read_stream_header,
)
from tests.decoder.conftest import SMALL_SIZE
from tests.decoder.fake_nvdec import (
    FakeCudaDriver,
    FakeDecodedFrame,
    FakeOpener,
    FakeOpenerFailure,
    pyav_frames,
)
from tests.decoder.test_frame_reader import write_full_range_video

Batches = list[tuple[np.ndarray, list[int], list[int]]]


@pytest.fixture(scope="module")
def small_frames(small_video: Path) -> list[FakeDecodedFrame]:
    return pyav_frames(small_video)


def joined(batches: Batches) -> tuple[np.ndarray, list[int], list[int]]:
    return (
        np.concatenate([frames for frames, _, _ in batches]),
        [index for _, indices, _ in batches for index in indices],
        [stamp for _, _, stamps in batches for stamp in stamps],
    )


def test_a_range_from_a_later_keyframe_matches_pyav(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    keyframe = probe_media(small_video).keyframes[2]
    opener = FakeOpener(small_frames)
    batches = list(
        iter_nvdec_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 15, 4, open_decoder=opener)
    )
    expected = list(iter_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 15, 4))
    assert [len(indices) for _, indices, _ in batches] == [4, 4, 4, 3]
    frames, indices, stamps = joined(batches)
    expected_frames, expected_indices, expected_stamps = joined(expected)
    assert indices == expected_indices == list(range(keyframe.frame_index, keyframe.frame_index + 15))
    assert stamps == expected_stamps
    assert np.array_equal(frames, expected_frames)
    (decoder,) = opener.opened
    assert decoder.calls == [
        ("seek_to_index", 0),
        ("get_batch_frames", 1),
        ("seek_to_index", keyframe.frame_index),
        *[("get_batch_frames", n) for n in (4, 4, 4, 3)],
    ]


def test_the_shift_is_measured_once_per_file(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    opener = FakeOpener(small_frames)
    for _ in range(2):
        list(
            iter_nvdec_frame_batches(
                small_video, keyframe.frame_index, keyframe.pts, 4, 4, open_decoder=opener, pool=DecoderPool(0)
            )
        )
    first, second = opener.opened
    assert first.calls[0] == ("seek_to_index", 0)
    assert second.calls == [("seek_to_index", keyframe.frame_index), ("get_batch_frames", 4)]


def test_a_finished_decoder_serves_the_next_request_pointed_at_its_file(
    small_video: Path, small_frames: list[FakeDecodedFrame]
) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    opener, pool = FakeOpener(small_frames), DecoderPool()
    batches = [
        joined(
            list(
                iter_nvdec_frame_batches(
                    small_video, keyframe.frame_index, keyframe.pts, 4, 4, open_decoder=opener, pool=pool
                )
            )
        )
        for _ in range(2)
    ]
    (decoder,) = opener.opened
    assert decoder.calls[-3:] == [
        ("reconfigure_decoder", 0),
        ("seek_to_index", keyframe.frame_index),
        ("get_batch_frames", 4),
    ]
    assert np.array_equal(batches[0][0], batches[1][0]) and batches[0][1:] == batches[1][1:]
    assert pool.idle() == 1


def test_a_decoder_left_by_a_failure_or_a_cancelled_call_is_not_reused(
    small_video: Path, small_frames: list[FakeDecodedFrame]
) -> None:
    pool = DecoderPool()
    failing = FakeOpener(small_frames, fail_after=6)
    with pytest.raises(NvdecDecodeError):
        list(iter_nvdec_frame_batches(small_video, 0, 0, 12, 4, open_decoder=failing, pool=pool))
    stopped = iter_nvdec_frame_batches(small_video, 0, 0, 12, 4, open_decoder=FakeOpener(small_frames), pool=pool)
    next(stopped)
    stopped.close()
    assert pool.idle() == 0


def test_the_pool_keeps_at_most_its_size(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    pool = DecoderPool(1)
    opener = FakeOpener(small_frames)
    for _ in range(2):
        pool.keep(opener(small_video, 0, "rgb24"), 0, "rgb24")
    assert pool.idle() == 1


def test_nv12_frames_are_pyavs_nv12_and_decoders_are_pooled_per_layout(small_video: Path) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    opener = FakeOpener(pyav_frames(small_video), nv12_frames=pyav_frames(small_video, "nv12"))
    pool = DecoderPool()
    for pixel_format in ("nv12", "rgb24", "nv12"):
        nvdec = joined(
            list(
                iter_nvdec_frame_batches(
                    small_video,
                    keyframe.frame_index,
                    keyframe.pts,
                    6,
                    4,
                    pixel_format=pixel_format,
                    open_decoder=opener,
                    pool=pool,
                )
            )
        )
        pyav = joined(
            list(iter_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 6, 4, pixel_format=pixel_format))
        )
        assert np.array_equal(nvdec[0], pyav[0]) and nvdec[1:] == pyav[1:]
    assert opener.asked == ["nv12", "rgb24"]
    width, height = SMALL_SIZE
    assert nvdec[0].shape[1:] == (height * 3 // 2, width)


def test_chunks_of_one_file_arriving_together_measure_the_shift_once(
    small_video: Path, small_frames: list[FakeDecodedFrame]
) -> None:
    forget_files()
    keyframe = probe_media(small_video).keyframes[1]
    release = threading.Event()
    opener = FakeOpener(small_frames, hold_first_start=release)

    def decode() -> None:
        list(iter_nvdec_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 4, 4, open_decoder=opener))

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(decode)
        assert opener.decoder(0).seeking_start.wait(timeout=30)
        second = pool.submit(decode)
        assert SHIFTS.wait_for_waiting(1, timeout=30), "the second chunk did not wait for the first's shift"
        release.set()
        first.result(timeout=30)
        second.result(timeout=30)
    measuring, waiting = opener.opened
    assert measuring.calls[0] == ("seek_to_index", 0)
    assert waiting.calls == [("seek_to_index", keyframe.frame_index), ("get_batch_frames", 4)]


def test_stamps_that_ignore_the_edit_list_are_mapped_onto_pyavs(
    small_video: Path, small_frames: list[FakeDecodedFrame]
) -> None:
    # NVDEC on the H200 stamped x264's frames two frame durations early: the MP4 edit list that PyAV
    # applies (and Probe's seek_pts reflects) is not applied to DecodedFrame.timestamp.
    early = [FakeDecodedFrame(frame.pixels, frame.timestamp - 1024) for frame in small_frames]
    keyframe = probe_media(small_video).keyframes[1]
    batches = list(
        iter_nvdec_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 6, 4, open_decoder=FakeOpener(early))
    )
    expected = list(iter_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 6, 4))
    assert joined(batches)[2] == joined(expected)[2]
    assert np.array_equal(joined(batches)[0], joined(expected)[0])


def test_batches_stay_within_max_batch_bytes(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    frame_bytes = 320 * 240 * 3
    batches = iter_nvdec_frame_batches(
        small_video, 0, 0, 10, 8, max_batch_bytes=3 * frame_bytes + 1, open_decoder=FakeOpener(small_frames)
    )
    assert [len(frames) for frames, _, _ in batches] == [3, 3, 3, 1]


def test_a_range_past_the_end_is_refused_like_pyav(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    last = probe_media(small_video).keyframes[-1]
    count = len(small_frames)
    with pytest.raises(NvdecDecodeError, match=rf"small\.mp4' is truncated or corrupt at frame {count}: the video"):
        list(
            iter_nvdec_frame_batches(
                small_video, last.frame_index, last.pts, count, 8, open_decoder=FakeOpener(small_frames)
            )
        )


def test_a_start_past_the_last_frame_is_refused_before_seeking(
    small_video: Path, small_frames: list[FakeDecodedFrame]
) -> None:
    opener = FakeOpener(small_frames)
    with pytest.raises(NvdecDecodeError, match="ends 3 of the 3 requested frames short"):
        list(iter_nvdec_frame_batches(small_video, len(small_frames), 0, 3, 8, open_decoder=opener))
    assert opener.opened[0].calls == []


def test_seek_pts_that_is_no_frame_is_refused(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    with pytest.raises(InvalidArgument, match=f"seek_pts {keyframe.pts + 1} is not the timestamp of a frame"):
        list(
            iter_nvdec_frame_batches(
                small_video, keyframe.frame_index, keyframe.pts + 1, 5, 8, open_decoder=FakeOpener(small_frames)
            )
        )


def test_timestamps_that_do_not_rise_are_refused(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    repeated = [small_frames[0], small_frames[0], *small_frames[2:]]
    with pytest.raises(NvdecDecodeError, match=r"at frame 1: NVDEC gave pts 0 after 0"):
        list(iter_nvdec_frame_batches(small_video, 0, 0, 4, 8, open_decoder=FakeOpener(repeated)))


def test_a_frame_of_another_size_is_refused(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    shrunk = FakeDecodedFrame(np.zeros((120, 160, 3), np.uint8), small_frames[1].timestamp)
    frames = [small_frames[0], shrunk, *small_frames[2:]]
    with pytest.raises(NvdecDecodeError, match=r"changes size at frame 1 \(320x240 rgb24 is 230400 bytes"):
        list(iter_nvdec_frame_batches(small_video, 0, 0, 4, 8, open_decoder=FakeOpener(frames)))


def test_a_failure_while_decoding_names_the_frame(small_video: Path, small_frames: list[FakeDecodedFrame]) -> None:
    batches = iter_nvdec_frame_batches(small_video, 0, 0, 12, 4, open_decoder=FakeOpener(small_frames, fail_after=6))
    assert len(next(batches)[0]) == 4
    with pytest.raises(NvdecDecodeError, match=r"corrupt at frame 4: NVDEC failed \(RuntimeError: CUDA_ERROR"):
        next(batches)


def test_a_frame_that_cannot_be_copied_from_the_gpu_fails_naming_it(
    small_video: Path, small_frames: list[FakeDecodedFrame]
) -> None:
    opener = FakeOpener(small_frames, driver=FakeCudaDriver(failing="cuMemcpy2D_v2"))
    with pytest.raises(
        NvdecDecodeError, match=r"frame 0 could not be copied from the GPU \(CudaCopyError: cuMemcpy2D_v2 failed"
    ):
        list(iter_nvdec_frame_batches(small_video, 0, 0, 4, 4, open_decoder=opener))


def test_a_session_that_does_not_open_is_an_open_error(small_video: Path) -> None:
    opener = FakeOpenerFailure(RuntimeError("CreateSimpleDecoder failed: no NVDEC"))
    with pytest.raises(NvdecOpenError, match=r"NVDEC on GPU 0 could not open it \(RuntimeError: CreateSimple"):
        list(iter_nvdec_frame_batches(small_video, 0, 0, 4, 8, open_decoder=opener))
    assert issubclass(NvdecOpenError, FailedPrecondition)


def test_an_image_is_not_opened_on_nvdec(tmp_path: Path) -> None:
    sample_media.make_two_person_image(tmp_path / "two.png", size=(320, 180))
    opener = FakeOpenerFailure(AssertionError("the decoder must not be opened"))
    with pytest.raises(NvdecUnsupported, match=r"two\.png' cannot be decoded on NVDEC: its codec is png"):
        list(iter_nvdec_frame_batches(tmp_path / "two.png", 0, 0, 1, 8, open_decoder=opener))
    assert opener.attempts == 0


def test_oversized_frames_are_refused_before_nvdec_or_a_buffer(oversized_video: Path) -> None:
    opener = FakeOpenerFailure(AssertionError("the decoder must not be opened"))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match=r"oversized\.mp4' is 6000x6000 .* the limit is 35\.7 Mpx"):
            list(iter_nvdec_frame_batches(oversized_video, 0, 0, 2, 8, open_decoder=opener))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert opener.attempts == 0
    assert peak < 16 * 1024 * 1024


class CountedHeaders:
    """read_stream_header, counting its calls."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self, path: Path, limits: InputLimits) -> StreamHeader:
        self.reads += 1
        return read_stream_header(path, limits)


def test_a_files_headers_are_read_once_until_it_changes(
    small_video: Path, small_frames: list[FakeDecodedFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = CountedHeaders()
    monkeypatch.setattr(nvdec_reader, "read_stream_header", counted)
    copy = tmp_path / "copy.mp4"
    shutil.copyfile(small_video, copy)
    for _ in range(3):
        list(iter_nvdec_frame_batches(copy, 0, 0, 4, 4, open_decoder=FakeOpener(small_frames)))
    assert counted.reads == 1
    os.utime(copy, ns=(0, copy.stat().st_mtime_ns + 1_000_000_000))
    list(iter_nvdec_frame_batches(copy, 0, 0, 4, 4, open_decoder=FakeOpener(small_frames)))
    assert counted.reads == 2


def test_a_file_past_the_limits_is_refused_every_time(oversized_video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = CountedHeaders()
    monkeypatch.setattr(nvdec_reader, "read_stream_header", counted)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match=r"the limit is 35\.7 Mpx"):
            list(iter_nvdec_frame_batches(oversized_video, 0, 0, 2, 8, open_decoder=FakeOpener([])))
    assert counted.reads == 2


def test_an_invalid_range_is_refused(small_video: Path) -> None:
    with pytest.raises(InvalidArgument, match="frame_count > 0"):
        list(iter_nvdec_frame_batches(small_video, 0, 0, 0, 8, open_decoder=FakeOpenerFailure(AssertionError())))


@pytest.mark.parametrize(
    ("codec", "pixel_format", "refusal"),
    [
        ("h264", "yuv420p", None),
        ("hevc", "yuvj420p", None),
        ("av1", "yuv420p", None),
        ("vp9", "yuv420p", "its codec is vp9"),
        ("png", "rgb24", "its codec is png"),
        ("h264", "yuv420p10le", "its pixel format is yuv420p10le"),
        ("hevc", "yuv444p", "its pixel format is yuv444p"),
        ("h264", None, "its pixel format is None"),
    ],
)
def test_nvdec_takes_8_bit_420_h264_hevc_and_av1(codec: str, pixel_format: str | None, refusal: str | None) -> None:
    found = nvdec_refusal(codec, pixel_format)
    if refusal is None:
        assert found is None
    else:
        assert found is not None and found.startswith(refusal), found


def test_a_full_range_stream_asked_for_nv12_is_decoded_to_rgb(tmp_path: Path, small_video: Path) -> None:
    path = write_full_range_video(tmp_path / "full.mp4")
    assert read_stream_header(path, DEFAULT_INPUT_LIMITS).full_range
    assert not read_stream_header(small_video, DEFAULT_INPUT_LIMITS).full_range
    opener = FakeOpener(pyav_frames(path))
    ((frames, _, _),) = list(iter_nvdec_frame_batches(path, 0, 0, 1, 1, pixel_format="nv12", open_decoder=opener))
    assert opener.asked == ["rgb24"] and frames.shape == (1, 32, 32, 3)

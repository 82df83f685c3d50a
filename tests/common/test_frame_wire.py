"""frame_wire writes the generated serialiser's bytes and reads them back as views."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.frames.frame_codec import pack_frames, unpack_frames
from services.common.frames.frame_streams import (
    DetectFrames,
    parse_detect_request,
    parse_encode_segment_request,
    serialize_detect_request,
    serialize_encode_segment_request,
)
from services.common.frames.frame_wire import (
    FrameBatchView,
    FrameRun,
    SharedFrameRun,
    parse_frame_batch,
    serialize_frame_batch,
)
from swapline.common.v1 import common_pb2
from swapline.detector.v1 import detector_pb2
from swapline.encoder.v1 import encoder_pb2


def frames(count: int, height: int = 4, width: int = 6) -> np.ndarray:
    return np.arange(count * height * width * 3, dtype=np.uint64).astype(np.uint8).reshape(count, height, width, 3)


def nv12_frames(count: int, height: int = 4, width: int = 6) -> np.ndarray:
    """(count, height * 3 / 2, width) NV12 frames, every byte of a frame different from its neighbours."""
    values = np.arange(count * height * 3 // 2 * width, dtype=np.uint64) * 5 + 1
    return values.astype(np.uint8).reshape(count, height * 3 // 2, width)


@pytest.mark.parametrize(
    ("indices", "pts"),
    [([0], None), ([7, 8, 9], [70, 80, 90]), ([2**40], [-3]), ([0, 1], [0, -(2**62)])],
)
def test_the_bytes_are_the_generated_serialisers(indices: list[int], pts: list[int] | None) -> None:
    batch = frames(len(indices))
    expected = pack_frames(batch, indices, pts).SerializeToString()
    assert serialize_frame_batch(FrameRun(batch, indices, pts)) == expected


@pytest.mark.parametrize(
    ("indices", "pts"),
    [([0], None), ([7, 8, 9], [70, 80, 90]), ([2**40], [-3])],
)
def test_nv12_bytes_are_the_generated_serialisers(indices: list[int], pts: list[int] | None) -> None:
    batch = nv12_frames(len(indices))
    expected = pack_frames(batch, indices, pts).SerializeToString()
    assert serialize_frame_batch(FrameRun(batch, indices, pts)) == expected


def test_nv12_frames_parse_back_with_their_layout_size_indices_and_stamps() -> None:
    batch = nv12_frames(3, height=8, width=10)
    view = parse_frame_batch(serialize_frame_batch(FrameRun(batch, [5, 6, 7], [-1, 0, 2**40])))
    assert (view.width, view.height, view.pixel_format) == (10, 8, "nv12")
    assert [len(frame.pixels) for frame in view.frames] == [120, 120, 120]
    unpacked, indices, stamps = unpack_frames(view)
    assert unpacked.shape == (3, 12, 10)
    assert unpacked.tobytes() == batch.tobytes()
    assert (indices, stamps) == ([5, 6, 7], [-1, 0, 2**40])


def test_generated_nv12_bytes_parse_and_frame_wire_bytes_read_as_generated_nv12() -> None:
    batch = nv12_frames(2)
    generated = parse_frame_batch(pack_frames(batch, [1, 2], [10, 20]).SerializeToString())
    assert generated.pixel_format == "nv12" and np.array_equal(unpack_frames(generated)[0], batch)
    written = common_pb2.FrameBatch.FromString(serialize_frame_batch(FrameRun(batch, [1, 2], [10, 20])))
    assert written.pixel_format == common_pb2.PIXEL_FORMAT_NV12
    assert (written.width, written.height) == (6, 4)
    unpacked, indices, stamps = unpack_frames(written)
    assert np.array_equal(unpacked, batch) and (indices, stamps) == ([1, 2], [10, 20])


def test_rgb_batches_parse_as_rgb() -> None:
    assert parse_frame_batch(serialize_frame_batch(FrameRun(frames(1), [0]))).pixel_format == "rgb24"


def test_a_single_nv12_frame_is_a_view_of_the_received_bytes() -> None:
    data = serialize_frame_batch(FrameRun(nv12_frames(1), [0]))
    unpacked, _, _ = unpack_frames(parse_frame_batch(data), copy=False)
    assert unpacked.shape == (1, 6, 6)
    assert np.shares_memory(unpacked, np.frombuffer(data, np.uint8))


def test_an_nv12_frame_of_the_wrong_size_is_invalid_after_parsing() -> None:
    view = parse_frame_batch(serialize_frame_batch(FrameRun(nv12_frames(1), [0])))
    wrong = FrameBatchView(width=view.width + 2, height=view.height, frames=view.frames, pixel_format="nv12")
    with pytest.raises(InvalidArgument, match="frame 0 has 36 bytes, expected 48 for 8x4 nv12"):
        unpack_frames(wrong)


def test_rgb_bytes_marked_nv12_are_invalid_after_parsing() -> None:
    generated = pack_frames(frames(1), [0])
    generated.pixel_format = common_pb2.PIXEL_FORMAT_NV12
    view = parse_frame_batch(generated.SerializeToString())
    with pytest.raises(InvalidArgument, match="frame 0 has 72 bytes, expected 36 for 6x4 nv12"):
        unpack_frames(view)


def test_an_unknown_pixel_format_is_invalid() -> None:
    generated = pack_frames(frames(1), [0])
    generated.pixel_format = 7  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="unknown pixel format 7"):
        parse_frame_batch(generated.SerializeToString())


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((1, 4, 6, 4), np.uint8),
        np.zeros((1, 5, 6), np.uint8),
        np.zeros((1, 6, 5), np.uint8),
        np.zeros((4, 6, 3), np.uint8),
        np.zeros((1, 4, 6, 3), np.float32),
        np.zeros((1, 6, 6), np.int8),
    ],
    ids=["rgba", "rows not a multiple of 3", "odd width", "no count", "float rgb", "int8 nv12"],
)
def test_arrays_of_other_shapes_or_dtypes_are_not_serialised(array: np.ndarray) -> None:
    with pytest.raises(InvalidArgument, match="frames must be"):
        serialize_frame_batch(FrameRun(array, list(range(len(array)))))


def test_an_empty_run_is_an_empty_batch_of_its_size() -> None:
    empty = np.zeros((0, 4, 6, 3), np.uint8)
    assert serialize_frame_batch(FrameRun(empty, [])) == common_pb2.FrameBatch(width=6, height=4).SerializeToString()


def test_generated_bytes_parse_to_the_same_frames() -> None:
    batch = frames(3)
    view = parse_frame_batch(pack_frames(batch, [5, 6, 7], [-1, 0, 9]).SerializeToString())
    unpacked, indices, stamps = unpack_frames(view)
    assert np.array_equal(unpacked, batch)
    assert (indices, stamps) == ([5, 6, 7], [-1, 0, 9])


def test_a_single_frame_is_a_view_of_the_received_bytes() -> None:
    data = serialize_frame_batch(FrameRun(frames(1), [0]))
    unpacked, _, _ = unpack_frames(parse_frame_batch(data), copy=False)
    assert np.shares_memory(unpacked, np.frombuffer(data, np.uint8))


def test_unknown_fields_are_skipped() -> None:
    data = serialize_frame_batch(FrameRun(frames(1), [3]))
    # Field 15 as a varint, field 16 as fixed64, then as fixed32.
    extra = b"\x78\x2a" + b"\x81\x01" + bytes(8) + b"\x85\x01" + bytes(4)
    view = parse_frame_batch(extra + data)
    assert (view.width, view.height, [frame.index for frame in view.frames]) == (6, 4, [3])


def test_a_truncated_message_is_invalid() -> None:
    data = serialize_frame_batch(FrameRun(frames(1), [0]))
    with pytest.raises(InvalidArgument, match="truncated frame message"):
        parse_frame_batch(data[:-1])


def test_a_frame_of_the_wrong_size_is_invalid_after_parsing() -> None:
    data = serialize_frame_batch(FrameRun(frames(1), [0]))
    view = parse_frame_batch(data)
    wrong = FrameBatchView(width=view.width + 1, height=view.height, frames=view.frames)
    with pytest.raises(InvalidArgument, match="frame 0 has 72 bytes, expected 84"):
        unpack_frames(wrong)


def test_frames_of_the_encode_stream_round_trip_through_the_generated_message() -> None:
    batch = frames(2)
    data = serialize_encode_segment_request(FrameRun(batch, [4, 5]))
    generated = encoder_pb2.EncodeSegmentRequest.FromString(data)
    assert generated.WhichOneof("payload") == "frames"
    assert np.array_equal(unpack_frames(generated.frames)[0], batch)
    parsed = parse_encode_segment_request(data)
    assert isinstance(parsed, FrameBatchView)
    assert np.array_equal(unpack_frames(parsed)[0], batch)


def test_nv12_frames_of_the_encode_stream_round_trip_through_the_generated_message() -> None:
    batch = nv12_frames(2)
    data = serialize_encode_segment_request(FrameRun(batch, [4, 5]))
    generated = encoder_pb2.EncodeSegmentRequest.FromString(data)
    assert generated.frames.pixel_format == common_pb2.PIXEL_FORMAT_NV12
    assert np.array_equal(unpack_frames(generated.frames)[0], batch)
    parsed = parse_encode_segment_request(data)
    assert isinstance(parsed, FrameBatchView) and parsed.pixel_format == "nv12"
    assert np.array_equal(unpack_frames(parsed)[0], batch)


def test_the_encode_streams_header_stays_a_generated_message() -> None:
    header = encoder_pb2.EncodeSegmentRequest(header=encoder_pb2.SegmentHeader(output_uri="s.mp4", width=6))
    parsed = parse_encode_segment_request(serialize_encode_segment_request(header))
    assert parsed == header


def test_a_message_repeating_the_frames_field_is_refused() -> None:
    data = serialize_encode_segment_request(FrameRun(frames(1), [0]))
    with pytest.raises(InvalidArgument, match="repeats field 2"):
        parse_encode_segment_request(data + data)


def test_a_detect_request_round_trips_through_the_generated_message() -> None:
    batch = frames(2)
    options = detector_pb2.DetectRequest(min_face_size=24, min_score=0.5)
    data = serialize_detect_request(DetectFrames(FrameRun(batch, [0, 1]), options))
    generated = detector_pb2.DetectRequest.FromString(data)
    assert (generated.min_face_size, generated.min_score) == (24, 0.5)
    assert np.array_equal(unpack_frames(generated.frames)[0], batch)
    parsed = parse_detect_request(data)
    assert parsed.options == options
    assert np.array_equal(unpack_frames(parsed.frames)[0], batch)


def test_a_generated_detect_request_parses_with_its_fields_in_any_order() -> None:
    batch = frames(1)
    data = detector_pb2.DetectRequest(frames=pack_frames(batch, [9]), min_face_size=30).SerializeToString()
    parsed = parse_detect_request(data)
    assert parsed.options == detector_pb2.DetectRequest(min_face_size=30)
    assert unpack_frames(parsed.frames)[1] == [9]


def test_a_detect_request_without_frames_has_an_empty_batch() -> None:
    parsed = parse_detect_request(detector_pb2.DetectRequest(min_face_size=30).SerializeToString())
    assert (len(parsed.frames.frames), parsed.options.min_face_size) == (0, 30)


def test_a_shared_batch_names_its_file_and_carries_no_pixels() -> None:
    run = SharedFrameRun("t-1-2-3.frames", "nv12", 6, 4, [7, 8], [70, 80])
    data = serialize_frame_batch(run)
    generated = common_pb2.FrameBatch.FromString(data)
    assert generated.shared.name == "t-1-2-3.frames" and generated.pixel_format == common_pb2.PIXEL_FORMAT_NV12
    assert [(frame.index, frame.pts, frame.pixels) for frame in generated.frames] == [(7, 70, b""), (8, 80, b"")]
    view = parse_frame_batch(data)
    assert (view.shared, view.width, view.height, view.pixel_format) == ("t-1-2-3.frames", 6, 4, "nv12")
    assert [(frame.index, frame.pts, len(frame.pixels)) for frame in view.frames] == [(7, 70, 0), (8, 80, 0)]


def test_a_batch_in_the_message_names_no_file() -> None:
    assert parse_frame_batch(serialize_frame_batch(FrameRun(frames(1), [0]))).shared == ""


def test_a_shared_batch_travels_in_an_encode_segment_request() -> None:
    message = parse_encode_segment_request(
        serialize_encode_segment_request(SharedFrameRun("s.frames", "rgb24", 6, 4, [3]))
    )
    assert isinstance(message, FrameBatchView) and message.shared == "s.frames"
    assert [frame.index for frame in message.frames] == [3]


def test_a_shared_name_that_is_not_utf8_is_refused() -> None:
    data = common_pb2.FrameBatch(width=6, height=4, shared=common_pb2.SharedFrames(name="x")).SerializeToString()
    broken = data.replace(b"\x01x", b"\x01\xff")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        parse_frame_batch(broken)

from __future__ import annotations

from services.worker.chunk_pipeline import ChunkStats
from services.worker.chunk_runner import chunk_stats_to_proto, segment_header
from swapline.chunks.v1 import chunks_pb2
from swapline.encoder.v1 import encoder_pb2


def test_the_segment_header_has_the_encoder_check_the_chunks_frame_count() -> None:
    lease = chunks_pb2.ChunkLease(
        segment_uri="jobs/j1/segments/3.mp4",
        fps=25.0,
        width=64,
        height=48,
        start_frame=120,
        frame_count=37,
        encode=encoder_pb2.EncodeSettings(crf=20, preset="fast"),
    )

    header = segment_header(lease)

    assert header.expected_frames == 37
    assert (header.output_uri, header.fps, header.width, header.height) == ("jobs/j1/segments/3.mp4", 25.0, 64, 48)
    assert (header.settings.crf, header.settings.preset) == (20, "fast")


def test_chunk_stats_report_the_frames_and_faces_of_the_run() -> None:
    stats = ChunkStats()
    for index, faces in ((120, 1), (121, 1), (122, 0)):
        stats.record_frame(index, faces)
    stats.fp32_fallbacks = 3

    message = chunk_stats_to_proto(stats)
    assert message.fp32_fallbacks == 3

    assert (message.frames, message.faces, message.frames_with_faces) == (3, 2, 2)
    assert [(change.frame_index, change.faces) for change in message.face_count_changes] == [(120, 1), (122, 0)]

"""Opening media for its packets only."""

from __future__ import annotations

from pathlib import Path

from services.cli import sample_media
from services.common.media_opener import PACKETS_ONLY, open_media


def test_a_file_opened_for_its_packets_decodes_nothing_and_loses_none(tmp_path: Path) -> None:
    video = sample_media.make_face_video(
        tmp_path / "clip.mp4", sample_media.astronaut_photo(), seconds=0.4, size=(160, 120), keyframe_seconds=0.2
    )
    with open_media(video) as decoded, open_media(video, PACKETS_ONLY) as packets_only:
        # The pixel format is what only a decoded frame tells: opening for packets never decoded one.
        assert decoded.streams.video[0].codec_context.format is not None
        assert packets_only.streams.video[0].codec_context.format is None
        assert [bytes(packet) for packet in packets_only.demux(video=0)] == [
            bytes(packet) for packet in decoded.demux(video=0)
        ]

from __future__ import annotations

from pathlib import Path

import av
import pytest

from services.cli import sample_media
from services.common.errors import InvalidArgument
from services.common.input_limits import InputLimits
from services.common.media_probe import probe_media
from tests.decoder.conftest import SMALL_FPS, SMALL_KEYFRAME_SECONDS, SMALL_SECONDS, SMALL_SIZE


def decoded_keyframe_flags(path: Path) -> list[bool]:
    with av.open(str(path)) as container:
        return [frame.key_frame for frame in container.decode(video=0)]


def test_video_probe_is_exact(small_video: Path) -> None:
    info = probe_media(small_video)
    frame_count = round(SMALL_SECONDS * SMALL_FPS)
    flags = decoded_keyframe_flags(small_video)
    assert info.kind == "video"
    assert info.frame_count == frame_count == len(flags)
    assert info.fps == SMALL_FPS
    assert (info.width, info.height) == SMALL_SIZE
    assert info.has_audio
    assert info.video_codec == "h264"
    assert info.duration_seconds == pytest.approx(SMALL_SECONDS, abs=1 / SMALL_FPS)
    gop = round(SMALL_KEYFRAME_SECONDS * SMALL_FPS)
    assert [key.frame_index for key in info.keyframes] == list(range(0, frame_count, gop))
    assert [key.frame_index for key in info.keyframes] == [index for index, key in enumerate(flags) if key]
    ticks_per_frame = info.time_base[1] // (info.time_base[0] * SMALL_FPS)
    expected_pts = [key.frame_index * ticks_per_frame for key in info.keyframes]
    assert [key.pts for key in info.keyframes] == expected_pts


def test_video_without_audio(tmp_path: Path) -> None:
    path = sample_media.make_face_video(
        tmp_path / "silent.mp4", sample_media.astronaut_photo(), seconds=0.4, size=(160, 120), audio=False
    )
    assert not probe_media(path).has_audio


@pytest.mark.parametrize(("name", "codec"), [("photo.png", "png"), ("photo.jpg", "mjpeg")])
def test_image_probe(tmp_path: Path, name: str, codec: str) -> None:
    import cv2

    path = tmp_path / name
    cv2.imwrite(str(path), cv2.cvtColor(sample_media.astronaut_photo(), cv2.COLOR_RGB2BGR))
    info = probe_media(path)
    assert info.kind == "image"
    assert info.frame_count == 1
    assert (info.width, info.height) == (512, 512)
    assert info.video_codec == codec
    assert not info.has_audio
    assert [(key.frame_index, key.pts) for key in info.keyframes] == [(0, 0)]


def test_text_file_is_not_media(tmp_path: Path) -> None:
    path = sample_media.make_not_media_file(tmp_path / "notes.mp4")
    with pytest.raises(InvalidArgument, match=r"notes\.mp4' is not a video or image"):
        probe_media(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(InvalidArgument, match=r"empty\.mp4' is empty"):
        probe_media(path)


def test_truncated_mp4_names_ffmpeg_reason(small_video: Path, tmp_path: Path) -> None:
    path = sample_media.make_truncated_mp4(small_video, tmp_path / "cut.mp4")
    with pytest.raises(InvalidArgument, match=r"cut\.mp4' is truncated or corrupt: moov atom not found"):
        probe_media(path)


def test_audio_only_file_has_no_video(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000, layout="stereo")
        samples = sample_media.chord_audio(0.5)
        for start in range(0, samples.shape[1] - 1024, 1024):
            chunk = samples[:, start : start + 1024].copy()
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 48000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InvalidArgument, match=r"tone\.m4a' has no video stream"):
        probe_media(path)


def test_text_file_read_as_text_art_is_not_media(tmp_path: Path) -> None:
    """FFmpeg's tty demuxer would show a .txt file as an ANSI-art video."""
    path = sample_media.make_not_media_file(tmp_path / "readme.txt")
    with pytest.raises(InvalidArgument, match=r"readme\.txt' is not a video or image"):
        probe_media(path)


def test_frames_past_the_pixel_limit_are_refused(oversized_video: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"oversized\.mp4' is 6000x6000 \(36\.0 Mpx\); the limit is 35\.7 Mpx"):
        probe_media(oversized_video)


def test_frame_count_past_the_limit_is_refused(small_video: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"small\.mp4' has more than 49 frames, the limit"):
        probe_media(small_video, InputLimits(max_frames=49))


def test_frame_count_on_the_limit_is_allowed(small_video: Path) -> None:
    assert probe_media(small_video, InputLimits(max_frames=50)).frame_count == 50


def test_duration_past_the_limit_is_refused(small_video: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"small\.mp4' lasts 2\.0 s; the limit is 1\.5 s"):
        probe_media(small_video, InputLimits(max_duration_seconds=1.5))


def test_images_are_held_to_the_image_limit_not_the_video_limit(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(sample_media.encode_png(sample_media.astronaut_photo()))
    assert probe_media(path, InputLimits(max_video_pixels=1)).kind == "image"
    with pytest.raises(InvalidArgument, match=r"photo\.png' is 512x512 .* the limit is 0\.3 Mpx \(262143 pixels\)"):
        probe_media(path, InputLimits(max_image_pixels=512 * 512 - 1))


def test_long_file_names_are_cut_in_messages(tmp_path: Path) -> None:
    path = tmp_path / f"{'n' * 200}.png"
    path.write_bytes(sample_media.encode_png(sample_media.astronaut_photo()))
    with pytest.raises(InvalidArgument) as raised:
        probe_media(path, InputLimits(max_image_pixels=1))
    assert f"the picture of '{'n' * 40}'... (204 characters) is 512x512" in raised.value.message
    assert "n" * 41 not in raised.value.message

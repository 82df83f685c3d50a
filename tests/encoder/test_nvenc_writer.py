from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from services.common.encode_options import X264_PRESETS
from services.common.errors import InvalidArgument, Unavailable
from services.common.frames.pixel_formats import rgb_to_i420, rgb_to_nv12
from services.common.media_probe import probe_media
from services.encoder.nvenc_writer import NVENC_PRESETS, NvencSegmentWriter, nvenc_quality
from tests.encoder.conftest import FPS, SIZE, decoded_frames
from tests.encoder.fake_nvenc import FakeNvenc, X264Session


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def nvenc_writer(path: Path, nvenc: FakeNvenc, fps: float = FPS, size: tuple[int, int] = SIZE) -> NvencSegmentWriter:
    return NvencSegmentWriter(path, fps, *size, crf=18, preset="veryfast", nvenc=nvenc)


def test_an_nvenc_segment_holds_every_frame_at_exact_timestamps(tmp_path: Path, original_frames: np.ndarray) -> None:
    nvenc = FakeNvenc()
    path = tmp_path / "segment.mp4"
    with nvenc_writer(path, nvenc) as writer:
        for start in range(0, 30, 7):
            writer.write(original_frames[start : min(start + 7, 30)])
    assert writer.close() == 30

    info = probe_media(path)
    assert (info.frame_count, info.fps, info.width, info.height, info.video_codec) == (30, FPS, *SIZE, "h264")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [packet for packet in container.demux(stream) if packet.size]
        stamps = [Fraction(packet.pts or 0) * (stream.time_base or 0) for packet in packets]
    assert stamps == [Fraction(i, FPS) for i in range(30)]
    assert packets[0].is_keyframe
    error = np.abs(decoded_frames(path).astype(np.int16) - original_frames[:30].astype(np.int16)).mean()
    assert error < 4.0
    # The session held frames back, then handed several over at once: the writer cut them into frames.
    (session,) = nvenc.sessions
    assert session.returned[0] == 0 and max(session.returned) > 1


def test_frames_go_to_nvenc_as_nv12_from_host_memory_with_the_mapped_settings(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    nvenc = FakeNvenc()
    with NvencSegmentWriter(tmp_path / "s.mp4", 30000 / 1001, *SIZE, crf=23, preset="slow", nvenc=nvenc) as writer:
        writer.write(original_frames[:3])
    (created,) = nvenc.created
    assert created == {
        "width": SIZE[0],
        "height": SIZE[1],
        "fmt": "NV12",
        "usecpuinputbuffer": True,
        "codec": "h264",
        "preset": "P5",
        "tuning_info": "high_quality",
        "rc": "vbr",
        "cq": "23",
        "fps": str(30000 / 1001),
        "bf": "0",
        "gop": "250",
        "idrperiod": "250",
        "repeatspspps": "1",
    }


def test_every_x264_preset_has_an_nvenc_preset_in_the_same_speed_order() -> None:
    assert set(NVENC_PRESETS) == set(X264_PRESETS)
    ranks = [int(NVENC_PRESETS[preset].removeprefix("P")) for preset in X264_PRESETS]
    assert ranks == sorted(ranks) and (ranks[0], ranks[-1]) == (1, 7)


def test_crf_carries_over_to_nvenc_quality_except_lossless() -> None:
    assert nvenc_quality(20) == 20
    assert nvenc_quality(51) == 51
    assert nvenc_quality(0) == 1


def test_nv12_is_the_i420_planes_with_u_and_v_interleaved(original_frames: np.ndarray) -> None:
    frame = original_frames[5]
    height, width = frame.shape[:2]
    nv12 = rgb_to_nv12(frame)
    assert nv12.shape == (height * 3 // 2, width)
    as_i420 = av.VideoFrame.from_ndarray(nv12, format="nv12").to_ndarray(format="yuv420p")
    assert np.array_equal(as_i420, rgb_to_i420(frame))


def test_nothing_is_at_the_path_until_close_and_discard_leaves_nothing(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    kept, dropped = tmp_path / "kept.mp4", tmp_path / "dropped.mp4"
    writer = nvenc_writer(kept, FakeNvenc())
    writer.write(original_frames[:20])
    other = nvenc_writer(dropped, FakeNvenc())
    other.write(original_frames[:20])
    assert not kept.exists() and not dropped.exists()
    other.discard()
    assert writer.close() == 20
    assert files_in(tmp_path) == ["kept.mp4"]


def test_a_session_that_does_not_open_fails_the_segment_and_leaves_nothing(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    writer = nvenc_writer(tmp_path / "s.mp4", FakeNvenc(failure=RuntimeError("NV_ENC_ERR_OUT_OF_MEMORY")))
    with pytest.raises(Unavailable, match=r"NVENC could not open an H\.264 session for 's\.mp4': .*OUT_OF_MEMORY"):
        writer.write(original_frames[:2])
    writer.discard()
    assert files_in(tmp_path) == []


def test_frames_beyond_nvenc_s_h264_limit_are_refused_before_any_session(tmp_path: Path) -> None:
    nvenc = FakeNvenc()
    with pytest.raises(InvalidArgument, match=r"NVENC encodes H\.264 up to 4096 pixels a side, got 4608x2592"):
        nvenc_writer(tmp_path / "big.mp4", nvenc, size=(4608, 2592))
    assert nvenc.created == [] and files_in(tmp_path) == []


def test_a_still_image_is_written_without_nvenc(tmp_path: Path, original_frames: np.ndarray) -> None:
    nvenc = FakeNvenc()
    with nvenc_writer(tmp_path / "still.png", nvenc) as writer:
        writer.write(original_frames[:1])
    written = cv2.cvtColor(cv2.imread(str(tmp_path / "still.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, original_frames[0]) and nvenc.created == []


def recorded_session_frames(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Copies of the frames every fake session is handed, in order."""
    handed: list[np.ndarray] = []
    encode = X264Session.Encode

    def recording(session: X264Session, frame: np.ndarray) -> bytes:
        handed.append(frame.copy())
        return encode(session, frame)

    monkeypatch.setattr(X264Session, "Encode", recording)
    return handed


def test_nv12_frames_reach_the_session_unchanged_and_flat(
    tmp_path: Path, original_frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = recorded_session_frames(monkeypatch)
    frames = np.stack([rgb_to_nv12(frame) for frame in original_frames[:12]])
    with nvenc_writer(tmp_path / "s.mp4", FakeNvenc()) as writer:
        writer.write(frames[:5])
        writer.write(frames[5:])
    assert writer.close() == 12
    assert len(handed) == 12
    assert all(sent.shape == (frame.size,) for sent, frame in zip(handed, frames, strict=True))
    assert all(np.array_equal(sent, frame.reshape(-1)) for sent, frame in zip(handed, frames, strict=True))
    assert probe_media(tmp_path / "s.mp4").frame_count == 12


def test_rgb_frames_reach_the_session_as_their_nv12(
    tmp_path: Path, original_frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = recorded_session_frames(monkeypatch)
    with nvenc_writer(tmp_path / "s.mp4", FakeNvenc()) as writer:
        writer.write(original_frames[:4])
    assert len(handed) == 4
    for sent, frame in zip(handed, original_frames[:4], strict=True):
        assert np.array_equal(sent, rgb_to_nv12(frame).reshape(-1))


def test_an_nvenc_segment_of_nv12_frames_decodes_close_to_the_originals(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    path = tmp_path / "segment.mp4"
    with nvenc_writer(path, FakeNvenc()) as writer:
        writer.write(np.stack([rgb_to_nv12(frame) for frame in original_frames[:20]]))
    decoded = decoded_frames(path)
    assert decoded.shape == original_frames[:20].shape
    assert np.abs(decoded.astype(np.int16) - original_frames[:20].astype(np.int16)).mean() < 4.0


def test_an_nvenc_segment_refuses_a_change_of_layout(tmp_path: Path, original_frames: np.ndarray) -> None:
    writer = nvenc_writer(tmp_path / "s.mp4", FakeNvenc())
    writer.write(np.stack([rgb_to_nv12(frame) for frame in original_frames[:2]]))
    with pytest.raises(InvalidArgument, match="was started with nv12 frames, got rgb24"):
        writer.write(original_frames[2:4])
    writer.discard()
    assert files_in(tmp_path) == []


def test_a_still_image_from_an_nv12_frame_is_written_without_nvenc(tmp_path: Path, original_frames: np.ndarray) -> None:
    nvenc = FakeNvenc()
    frame = rgb_to_nv12(original_frames[0])
    with nvenc_writer(tmp_path / "still.png", nvenc) as writer:
        writer.write(frame[None])
    written = cv2.cvtColor(cv2.imread(str(tmp_path / "still.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_NV12)) and nvenc.created == []

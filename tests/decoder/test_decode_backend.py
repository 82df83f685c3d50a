"""Choosing NVDEC or PyAV, on fakes for the module, the GPU and the stream, and PyAV's fallback under auto."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.cli import sample_media
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.input_limits import DEFAULT_INPUT_LIMITS
from services.common.media_probe import probe_media
from services.common.settings_loader import SettingsError, load_settings
from services.decoder.decode_backend import (
    DECODE_BACKENDS,
    FALLBACK_REASONS,
    BackendChoice,
    NvdecPresence,
    choose_backend,
    gpu_missing,
    iter_decoded_batches,
    nvdec_module_missing,
    select_backend,
    video_driver_missing,
)
from services.decoder.frame_reader import DEFAULT_MAX_BATCH_BYTES, iter_frame_batches
from services.decoder.nvdec_reader import NvdecOpener, NvdecOpenError, NvdecUnsupported
from services.decoder.settings import ENV_PREFIX, DecoderSettings
from tests.decoder.fake_nvdec import FakeOpener, FakeOpenerFailure, pyav_frames

PRESENT = NvdecPresence()
NO_MODULE = NvdecPresence(module_missing="PyNvVideoCodec does not import (No module named 'PyNvVideoCodec')")
NO_GPU = NvdecPresence(gpu_missing="NVML cannot be read, so no GPU is visible (Driver Not Loaded)")
NO_VIDEO = NvdecPresence(video_driver_missing="libnvcuvid.so.1 does not load: NVIDIA_DRIVER_CAPABILITIES ...")
NVDEC_AUTO = BackendChoice("auto", "nvdec", "test")
NVDEC_ONLY = BackendChoice("nvdec", "nvdec", "test")


def test_the_choices_are_written_once() -> None:
    assert DECODE_BACKENDS == ("auto", "nvdec", "cpu")
    assert FALLBACK_REASONS == ("unsupported_stream", "open_failed", "decode_failed")


@pytest.mark.parametrize("requested", ["auto", "nvdec"])
def test_nvdec_is_taken_when_everything_it_needs_is_there(requested: str) -> None:
    choice = choose_backend(requested, PRESENT)  # type: ignore[arg-type]
    assert (choice.requested, choice.active) == (requested, "nvdec")


@pytest.mark.parametrize("presence", [PRESENT, NO_MODULE, NO_GPU])
def test_cpu_is_pyav_whatever_the_node_has(presence: NvdecPresence) -> None:
    assert choose_backend("cpu", presence).active == "cpu"


@pytest.mark.parametrize("presence", [NO_MODULE, NO_GPU, NO_VIDEO])
def test_auto_falls_back_to_pyav_and_says_why(presence: NvdecPresence) -> None:
    choice = choose_backend("auto", presence)
    assert choice.active == "cpu"
    (missing,) = presence.missing()
    assert missing in choice.reason


@pytest.mark.parametrize("presence", [NO_MODULE, NO_GPU, NO_VIDEO])
def test_nvdec_that_cannot_be_had_fails_naming_why(presence: NvdecPresence) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        choose_backend("nvdec", presence)
    (missing,) = presence.missing()
    assert "SWAPLINE_DECODER_BACKEND=nvdec, but NVDEC cannot be used" in raised.value.message
    assert missing in raised.value.message


def test_every_missing_part_is_named() -> None:
    choice = choose_backend("auto", NvdecPresence("no module", "no GPU", "no libnvcuvid"))
    assert choice.reason.endswith("no module; no GPU; no libnvcuvid")


def test_the_start_up_choice_is_logged_and_exported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.decoder.decode_backend"):
        choice = select_backend("auto", 0, probe=lambda gpu_id: NO_GPU)
    assert choice.active == "cpu"
    assert [record.getMessage() for record in caplog.records] == [
        f"decoder backend: cpu (auto requested): {choice.reason}"
    ]
    labels = {"requested": "auto", "active": "cpu", "reason": choice.reason}
    assert REGISTRY.get_sample_value("swapline_decoder_backend_info", labels) == 1.0


def test_cpu_probes_nothing() -> None:
    def probe(gpu_id: int) -> NvdecPresence:
        raise AssertionError("cpu must not look for a GPU")

    assert select_backend("cpu", 0, probe=probe).active == "cpu"


def test_nvdec_at_start_up_without_a_gpu_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="NVML cannot be read"):
        select_backend("nvdec", 0, probe=lambda gpu_id: NO_GPU)


def test_the_module_probe_names_the_module() -> None:
    assert nvdec_module_missing("json") is None
    missing = nvdec_module_missing("swapline_no_such_module")
    assert missing is not None and missing.startswith("swapline_no_such_module does not import")


class FakeNvmlError(Exception):
    pass


@dataclass
class FakeNvml:
    """pynvml's calls the GPU probe makes: a driver that fails to load, or one that sees `count` GPUs."""

    count: int = 0
    loads: bool = True
    shut_down: bool = False
    NVMLError = FakeNvmlError

    def nvmlInit(self) -> None:
        if not self.loads:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlShutdown(self) -> None:
        self.shut_down = True


def test_the_gpu_probe_reads_nvml() -> None:
    assert gpu_missing(0, FakeNvml(count=1)) is None
    assert gpu_missing(1, FakeNvml(count=1)) == "GPU 1 is not visible (NVML sees 1)"
    assert gpu_missing(0, FakeNvml(count=0)) == "GPU 0 is not visible (NVML sees 0)"
    assert gpu_missing(0, FakeNvml(loads=False)) == "NVML cannot be read, so no GPU is visible (Driver Not Loaded)"
    nvml = FakeNvml(count=2)
    gpu_missing(0, nvml)
    assert nvml.shut_down


def test_the_video_driver_probe_names_the_capability() -> None:
    def missing_library(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    assert video_driver_missing(load=lambda name: object()) is None
    missing = video_driver_missing(load=missing_library)
    assert missing is not None
    assert "libnvcuvid.so.1 does not load" in missing and "NVIDIA_DRIVER_CAPABILITIES must include video" in missing


def test_the_backend_setting_is_validated() -> None:
    environ = {"SWAPLINE_DECODER_MEDIA_ROOT": "m", "SWAPLINE_DECODER_BACKEND": "nvdec"}
    assert load_settings(DecoderSettings, ENV_PREFIX, environ).backend == "nvdec"
    assert DecoderSettings(media_root=Path("m")).backend == "auto"
    with pytest.raises(SettingsError, match="SWAPLINE_DECODER_BACKEND='gpu' is not one of auto, nvdec, cpu"):
        load_settings(DecoderSettings, ENV_PREFIX, {**environ, "SWAPLINE_DECODER_BACKEND": "gpu"})


def decoded(
    backend: BackendChoice, path: Path, start: int, seek_pts: int, count: int, batch: int, opener: NvdecOpener
) -> tuple[np.ndarray, list[int], list[int]]:
    batches = list(
        iter_decoded_batches(
            backend,
            path,
            start,
            seek_pts,
            count,
            batch,
            DEFAULT_INPUT_LIMITS,
            DEFAULT_MAX_BATCH_BYTES,
            open_decoder=opener,
        )
    )
    return (
        np.concatenate([frames for frames, _, _ in batches]),
        [index for _, indices, _ in batches for index in indices],
        [stamp for _, _, stamps in batches for stamp in stamps],
    )


def pyav_decoded(
    path: Path, start: int, seek_pts: int, count: int, batch: int
) -> tuple[np.ndarray, list[int], list[int]]:
    batches = list(iter_frame_batches(path, start, seek_pts, count, batch))
    return (
        np.concatenate([frames for frames, _, _ in batches]),
        [index for _, indices, _ in batches for index in indices],
        [stamp for _, _, stamps in batches for stamp in stamps],
    )


def fallbacks(reason: str) -> float:
    value = REGISTRY.get_sample_value("swapline_decoder_pyav_fallbacks_total", {"reason": reason})
    assert value is not None, f"no series for {reason}"
    return value


def test_every_fallback_reason_is_exported_before_any_fallback() -> None:
    assert all(fallbacks(reason) >= 0 for reason in FALLBACK_REASONS)


def test_auto_decodes_with_pyav_exactly_when_nvdec_does_not_open(
    small_video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    opener = FakeOpenerFailure(ImportError("No module named 'PyNvVideoCodec'"))
    before = fallbacks("open_failed")
    with caplog.at_level(logging.WARNING, logger="services.decoder.decode_backend"):
        frames, indices, stamps = decoded(NVDEC_AUTO, small_video, keyframe.frame_index, keyframe.pts, 14, 4, opener)
    expected_frames, expected_indices, expected_stamps = pyav_decoded(
        small_video, keyframe.frame_index, keyframe.pts, 14, 4
    )
    assert opener.attempts == 1
    assert indices == expected_indices == list(range(keyframe.frame_index, keyframe.frame_index + 14))
    assert stamps == expected_stamps
    assert np.array_equal(frames, expected_frames)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "decoding with PyAV instead of NVDEC (open_failed): 'small.mp4': NVDEC on GPU 0 could not open it "
        "(ImportError: No module named 'PyNvVideoCodec')"
    )
    assert fallbacks("open_failed") == before + 1


def test_auto_finishes_with_pyav_when_nvdec_fails_part_way(small_video: Path) -> None:
    opener = FakeOpener(pyav_frames(small_video), fail_after=9)
    before = fallbacks("decode_failed")
    frames, indices, stamps = decoded(NVDEC_AUTO, small_video, 0, 0, 20, 4, opener)
    expected_frames, expected_indices, expected_stamps = pyav_decoded(small_video, 0, 0, 20, 4)
    # NVDEC read frame 0 for its timestamp shift and delivered frames 0-7 before failing; PyAV delivers
    # 8-19 and nothing twice.
    batches = [call for call in opener.opened[0].calls if call[0] == "get_batch_frames"]
    assert batches == [("get_batch_frames", 1)] + [("get_batch_frames", 4)] * 3
    assert indices == expected_indices == list(range(20))
    assert stamps == expected_stamps
    assert np.array_equal(frames, expected_frames)
    assert fallbacks("decode_failed") == before + 1


def test_auto_hands_a_stream_nvdec_does_not_take_to_pyav(tmp_path: Path) -> None:
    image = sample_media.make_two_person_image(tmp_path / "two.png", size=(320, 180))
    opener = FakeOpenerFailure(AssertionError("the decoder must not be opened"))
    before = fallbacks("unsupported_stream")
    frames, indices, _ = decoded(NVDEC_AUTO, tmp_path / "two.png", 0, 0, 1, 8, opener)
    assert indices == [0] and np.array_equal(frames[0], image)
    assert opener.attempts == 0
    assert fallbacks("unsupported_stream") == before + 1


def test_auto_leaves_a_corrupt_file_to_pyav_to_judge(small_video: Path) -> None:
    count = probe_media(small_video).frame_count
    with pytest.raises(InvalidArgument, match=rf"small\.mp4' is truncated or corrupt at frame {count}"):
        decoded(NVDEC_AUTO, small_video, 0, 0, count + 1, 8, FakeOpener(pyav_frames(small_video)))


def test_nvdec_only_does_not_fall_back(small_video: Path, tmp_path: Path) -> None:
    with pytest.raises(NvdecOpenError, match="could not open it"):
        decoded(NVDEC_ONLY, small_video, 0, 0, 4, 4, FakeOpenerFailure(RuntimeError("no session")))
    sample_media.make_two_person_image(tmp_path / "two.png", size=(320, 180))
    with pytest.raises(NvdecUnsupported, match="its codec is png"):
        decoded(NVDEC_ONLY, tmp_path / "two.png", 0, 0, 1, 8, FakeOpenerFailure(AssertionError()))


def test_cpu_never_opens_nvdec(small_video: Path) -> None:
    opener = FakeOpenerFailure(AssertionError("cpu must not open NVDEC"))
    frames, indices, _ = decoded(BackendChoice("cpu", "cpu", "test"), small_video, 0, 0, 5, 8, opener)
    assert indices == list(range(5)) and len(frames) == 5
    assert opener.attempts == 0

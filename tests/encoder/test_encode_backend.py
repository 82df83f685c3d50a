from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from services.common.errors import FailedPrecondition
from services.encoder.encode_backend import (
    ENCODE_BACKENDS,
    NvencModule,
    NvencUnavailable,
    choose_backend,
    probe_nvenc,
    select_backend,
)
from tests.encoder.fake_nvenc import FakeNvenc

# What opening a session does on a GPU without NVENC, such as the H100 and H200.
NO_ENCODE_DEVICE = RuntimeError("nvEncOpenEncodeSessionEx failed: NV_ENC_ERR_NO_ENCODE_DEVICE")


def missing_module() -> NvencModule:
    raise ModuleNotFoundError("No module named 'PyNvVideoCodec'")


def loads(module: FakeNvenc) -> NvencModule:
    return module


def test_the_backends_are_auto_nvenc_and_libx264() -> None:
    assert ENCODE_BACKENDS == ("auto", "nvenc", "libx264")


def test_a_missing_module_leaves_auto_on_libx264_saying_why() -> None:
    choice = choose_backend("auto", lambda: probe_nvenc(missing_module))
    assert (choice.active, choice.nvenc) == ("libx264", None)
    assert "PyNvVideoCodec does not import (ModuleNotFoundError" in choice.reason


def test_a_gpu_without_nvenc_leaves_auto_on_libx264() -> None:
    without = FakeNvenc(failure=NO_ENCODE_DEVICE)
    choice = choose_backend("auto", lambda: probe_nvenc(lambda: loads(without)))
    assert (choice.active, choice.nvenc) == ("libx264", None)
    assert "no H.264 NVENC session works" in choice.reason and "NV_ENC_ERR_NO_ENCODE_DEVICE" in choice.reason
    assert len(without.created) == 1


def test_a_session_that_encodes_chooses_nvenc_with_the_module() -> None:
    nvenc = FakeNvenc()
    choice = choose_backend("auto", lambda: probe_nvenc(lambda: loads(nvenc)))
    assert (choice.active, choice.nvenc) == ("nvenc", nvenc)
    (probe,) = nvenc.sessions
    assert sum(probe.returned) == 3
    (created,) = nvenc.created
    assert (created["fmt"], created["usecpuinputbuffer"], created["codec"]) == ("NV12", True, "h264")


def test_a_session_that_gives_no_bitstream_is_no_nvenc() -> None:
    class Silent:
        def Encode(self, frame: object) -> bytes:
            return b""

        def EndEncode(self) -> bytes:
            return b""

    class SilentModule:
        def CreateEncoder(self, width: int, height: int, fmt: str, usecpuinputbuffer: bool, **options: str) -> Silent:
            return Silent()

    with pytest.raises(NvencUnavailable, match="returned no bitstream"):
        probe_nvenc(SilentModule)


def test_nvenc_asked_for_where_there_is_none_stops_the_start() -> None:
    without = FakeNvenc(failure=NO_ENCODE_DEVICE)
    with pytest.raises(FailedPrecondition, match=r"BACKEND=nvenc, but NVENC cannot be used: no H\.264 NVENC session"):
        choose_backend("nvenc", lambda: probe_nvenc(lambda: loads(without)))


def test_libx264_asked_for_never_probes() -> None:
    def must_not_probe() -> NvencModule:
        raise AssertionError("libx264 must not touch the GPU")

    assert choose_backend("libx264", must_not_probe).active == "libx264"


def test_auto_on_this_machine_is_libx264_logged_and_exported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="services.encoder.encode_backend"):
        choice = select_backend("auto")
    assert choice.active == "libx264"
    assert f"encoder backend: libx264 (auto requested): {choice.reason}" in caplog.text
    labels = {"requested": "auto", "active": "libx264", "reason": choice.reason}
    assert REGISTRY.get_sample_value("swapline_encoder_backend_info", labels) == 1.0

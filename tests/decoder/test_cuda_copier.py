"""The copier from GPU memory, run against FakeCudaDriver: host addresses stand for device pointers."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from services.decoder.cuda_copier import CudaCopyError, CudaFrameCopier, PlaneLayout, plane_layout
from tests.decoder.fake_nvdec import FakeCudaDriver, device_planes, fake_copier


def interface(shape: tuple[int, ...], strides: tuple[int, ...] | None, typestr: str = "|u1") -> dict[str, object]:
    return {"shape": shape, "strides": strides, "typestr": typestr, "data": (4096, False), "version": 3}


def test_a_packed_plane_has_its_row_bytes_as_pitch() -> None:
    assert plane_layout(interface((1080, 1920, 1), None)) == PlaneLayout(4096, 1080, 1920, 1920)


def test_a_pitched_chroma_plane_keeps_its_pitch() -> None:
    assert plane_layout(interface((540, 960, 2), (2048, 2, 1))) == PlaneLayout(4096, 540, 1920, 2048)


def test_a_two_dimensional_plane_is_rows_of_bytes() -> None:
    assert plane_layout(interface((4, 6), (8, 1))) == PlaneLayout(4096, 4, 6, 8)


@pytest.mark.parametrize(
    "shape, strides, typestr",
    [
        ((4, 6, 3), (18, 3, 1), "<f4"),  # not bytes
        ((4, 6, 3), (12, 3, 1), "|u1"),  # a pitch shorter than a row
        ((4, 6, 3), (18, 1, 6), "|u1"),  # planar channels, not pixels packed in a row
        ((4,), (1,), "|u1"),  # not rows
    ],
)
def test_a_plane_that_is_not_rows_of_packed_bytes_is_refused(
    shape: tuple[int, ...], strides: tuple[int, ...], typestr: str
) -> None:
    with pytest.raises(CudaCopyError, match="plane"):
        plane_layout(interface(shape, strides, typestr))


def test_nv12_planes_at_their_pitch_come_out_as_one_packed_frame() -> None:
    frame = np.arange(12 * 8, dtype=np.uint8).reshape(12, 8)  # an 8x8 NV12 frame
    driver = FakeCudaDriver()
    out = np.zeros_like(frame)
    fake_copier(driver).copy_planes(device_planes(frame), out)
    assert np.array_equal(out, frame)
    assert driver.copies == 2


def test_the_context_is_made_current_for_each_copy() -> None:
    driver = FakeCudaDriver()
    copier = fake_copier(driver, gpu_id=1)
    frame = np.ones((6, 4, 3), np.uint8)
    copier.copy_planes(device_planes(frame), np.zeros_like(frame))
    driver.current_context = None  # as in an executor thread that never used CUDA
    copier.copy_planes(device_planes(frame), np.zeros_like(frame))
    assert driver.current_context == 0x1001


def test_a_host_frame_of_another_size_is_refused_before_any_copy() -> None:
    driver = FakeCudaDriver()
    with pytest.raises(CudaCopyError, match="hold 96 bytes, the host frame 95"):
        fake_copier(driver).copy_planes(device_planes(np.zeros((12, 8), np.uint8)), np.zeros(95, np.uint8))
    assert driver.copies == 0


@pytest.mark.parametrize("call", ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"])
def test_a_driver_that_refuses_to_start_is_named(call: str) -> None:
    with pytest.raises(CudaCopyError, match=f"{call} failed: CUDA_ERROR_ILLEGAL_ADDRESS \\(700\\)"):
        fake_copier(FakeCudaDriver(failing=call))


def test_a_failed_copy_names_the_call_and_the_error() -> None:
    copier = fake_copier(FakeCudaDriver(failing="cuMemcpy2D_v2"))
    frame = np.zeros((6, 4, 3), np.uint8)
    with pytest.raises(CudaCopyError, match="cuMemcpy2D_v2 failed: CUDA_ERROR_ILLEGAL_ADDRESS"):
        copier.copy_planes(device_planes(frame), np.zeros_like(frame))


def test_a_missing_driver_library_is_named() -> None:
    def missing(library: str) -> ctypes.CDLL:
        raise OSError(f"{library}: cannot open shared object file")

    with pytest.raises(CudaCopyError, match=r"libcuda\.so\.1 does not load"):
        CudaFrameCopier(0, load=missing)

"""The GPU wait setting, applied through a stand-in for the CUDA driver's primary-context calls."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.common.cuda_waiting import CUDA_WAITS, SCHEDULING_FLAGS, apply_cuda_wait
from services.common.settings_loader import SettingsError
from services.triton.settings import cuda_wait_from_env


@dataclass
class FakeDriver:
    devices: int = 2
    started: bool = True
    refusing_device: int | None = None
    flags: dict[int, int] = field(default_factory=dict)

    def cuInit(self, flags: int) -> int:
        return 0 if self.started else 100  # CUDA_ERROR_NO_DEVICE

    def cuDeviceGetCount(self, count: Any) -> int:
        count._obj.value = self.devices
        return 0

    def cuDeviceGet(self, device: Any, ordinal: int) -> int:
        device._obj.value = ordinal
        return 0

    def cuDevicePrimaryCtxSetFlags_v2(self, device: ctypes.c_int, flags: int) -> int:
        if device.value == self.refusing_device:
            return 1  # CUDA_ERROR_INVALID_VALUE
        self.flags[device.value] = flags
        return 0


def test_each_wait_is_one_scheduling_flag() -> None:
    assert sorted(SCHEDULING_FLAGS) == sorted(CUDA_WAITS)
    assert SCHEDULING_FLAGS["block"] == 4  # CU_CTX_SCHED_BLOCKING_SYNC


@pytest.mark.parametrize("wait", CUDA_WAITS)
def test_every_gpu_gets_the_wait(wait: Any) -> None:
    driver = FakeDriver()
    assert apply_cuda_wait(wait, load=lambda library: driver) == 2
    assert driver.flags == {0: SCHEDULING_FLAGS[wait], 1: SCHEDULING_FLAGS[wait]}


def test_no_driver_library_sets_nothing() -> None:
    def missing(library: str) -> Any:
        raise OSError(f"{library}: cannot open shared object file")

    assert apply_cuda_wait("block", load=missing) == 0


def test_a_driver_without_gpus_sets_nothing() -> None:
    driver = FakeDriver(started=False)
    assert apply_cuda_wait("block", load=lambda library: driver) == 0
    assert driver.flags == {}


def test_a_refusing_gpu_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    driver = FakeDriver(refusing_device=1)
    assert apply_cuda_wait("block", load=lambda library: driver) == 1
    assert "GPU 1 refused the block wait" in caplog.text


def test_the_stubs_read_their_wait_with_block_as_default() -> None:
    assert cuda_wait_from_env({}) == "block"
    assert cuda_wait_from_env({"SWAPLINE_TRITON_CUDA_WAIT": "auto"}) == "auto"


def test_a_wait_that_is_not_a_choice_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="SWAPLINE_TRITON_CUDA_WAIT"):
        cuda_wait_from_env({"SWAPLINE_TRITON_CUDA_WAIT": "sometimes"})

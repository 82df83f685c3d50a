"""Worker settings, read from SWAPLINE_WORKER_* environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.cuda_waiting import CudaWait
from services.common.errors import FailedPrecondition
from services.common.frames.frame_memory import FrameMemorySettings
from services.common.frames.pixel_formats import PixelFormat
from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged

SETTINGS_PREFIX = "SWAPLINE_WORKER_"

# Where faces are aligned and pasted back: OpenCV on the host, or torch on a CUDA GPU.
WarpDevice = Literal["cpu", "cuda"]
# "auto": CUDA where torch imports and sees a GPU, the host otherwise.
WarpDeviceSetting = Literal["auto", WarpDevice]
# How frames cross from the decoder, through the worker, to the encoder (pixel_formats). "auto": what the face warper
# asks for, NV12 on a GPU and on the host (half RGB's bytes each hop, no colour conversion in the decoder or the
# encoder); either warper takes either layout.
FrameFormatSetting = Literal["auto", PixelFormat]
# The NVIDIA driver's control device, present on every machine and container that can reach a GPU.
NVIDIA_CONTROL_DEVICE = Path("/dev/nvidiactl")


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(ServerSettings, FrameMemorySettings):
    gateway_target: str
    decoder_target: str
    detector_target: str
    encoder_target: str
    triton_url: str
    # The residency service beside the Triton server (services/residency), which loads the imported models a
    # job names; "" where Triton serves every model of its repository (no explicit model control).
    residency_target: str = ""
    worker_id: str = ranged(default_factory=default_worker_id, max_length=253)
    # Chunks in flight per process; more than one overlaps one chunk's waits with another's work.
    concurrency: int = ranged(1, ge=1, le=64)
    # Frames per decoded batch: the unit that moves through the pipeline's stages.
    batch_size: int = ranged(8, ge=1, le=256)
    # Frames are shrunk so their long side is at most this before detection; faces are scaled back.
    detect_max_side: int = ranged(640, ge=32, le=8192)
    # Smallest face side in full-frame pixels; 0 keeps the detector's default.
    min_face_size: int = ranged(0, ge=0, le=8192)
    heartbeat_seconds: float = ranged(5.0, gt=0.0, le=600.0)
    triton_timeout_seconds: float = ranged(60.0, gt=0.0)
    # Tensors to and from Triton through shared memory instead of the gRPC payload: only where
    # tritonserver shares this process's /dev/shm (the embedded stack); otherwise it turns itself off.
    triton_shared_memory: bool = False
    lease_wait_seconds: float = ranged(10.0, ge=0.0, le=60.0)
    # Where faces are aligned and pasted back. Without a GPU, OpenCV is the faster way: at 1080p it took
    # 1.8 ms a frame with one face and 6.8 with six, torch on the same CPU 14 and 35 (2-core VM).
    device: WarpDeviceSetting = "auto"
    frame_format: FrameFormatSetting = "auto"
    # How threads wait for the GPU when faces are warped there (services/common/cuda_waiting.py): block sleeps,
    # CUDA's own auto spins a core for as long as the GPU takes.
    cuda_wait: CudaWait = "block"


def cuda_unavailable_reason() -> str:
    """Why torch cannot warp on CUDA in this process, or "" when it can.

    Torch is imported only where the NVIDIA driver is present: importing it costs a worker about 2.5 s
    and 250 MB, for nothing on a machine without a GPU.
    """
    if not NVIDIA_CONTROL_DEVICE.exists():
        return f"there is no NVIDIA driver ({NVIDIA_CONTROL_DEVICE} is missing)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return ""


def resolve_warp_device(setting: WarpDeviceSetting) -> WarpDevice:
    """The device the setting means here, checked at start-up: asking for CUDA where there is none fails."""
    if setting == "cpu":
        return "cpu"
    reason = cuda_unavailable_reason()
    if setting == "cuda" and reason:
        raise FailedPrecondition(f"{SETTINGS_PREFIX}DEVICE=cuda, but {reason}")
    return "cpu" if reason else "cuda"


def resolve_frame_format(setting: FrameFormatSetting, preferred: PixelFormat) -> PixelFormat:
    """The layout the worker asks the decoder for: the one set, or under auto the face warper's `preferred`."""
    return preferred if setting == "auto" else setting

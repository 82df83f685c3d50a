"""Where the MTCNN cascade's time goes on a device: each phase timed inclusively, the device synchronised
around it, over batches of the six-person frame at the detector's 640x360.

Run as `python -m services.bench.cascade_profile --device cuda` (the GPU machine) or on the CPU. The
cascade is loaded as the embedded Triton serves it (torch definition, served precision), and its module
functions and nets are wrapped with timers for this process only. Prints JSON: a batch's time without
the timers and, on CUDA, how many times it waits for the device; per phase the calls, total and per-batch
milliseconds; per NMS call the boxes per group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from services.cli.sample_media import make_group_image
from services.common.torch_catalog import TORCH_PRECISIONS, TorchPrecision
from services.common.torch_runtime import TorchModel, run_module
from services.detector.face_detector import CASCADE_MODEL, COUNTS, DetectionDefaults
from services.model_build import mtcnn_cascade
from services.model_build.torch_models import load_built_in

DETECT_SIZE = (640, 360)
# The module-level steps the cascade's methods call through the module's globals.
TIMED_FUNCTIONS = ("resize_area", "pyramid_crops", "rank_in_groups", "greedy_keep", "nms")
TIMED_METHODS = ("detect_group", "propose", "refine", "output")


class PhaseClock:
    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.nms_widths: list[list[int]] = []

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def timed(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*arguments: Any, **keywords: Any) -> Any:
            if name == "greedy_keep":
                self.nms_widths.append(list(arguments[1].sum(dim=1).tolist()))
            with self.phase(name):
                return call(*arguments, **keywords)

        return timed_call


def group_frames(count: int) -> np.ndarray:
    """The six-person picture at the detection size, shifted a pixel a frame as a panning camera would."""
    picture = cv2.resize(make_group_image(), DETECT_SIZE, interpolation=cv2.INTER_AREA)
    frames = [np.roll(picture, shift=index, axis=1) for index in range(count)]
    return np.ascontiguousarray(np.stack(frames))


def plain_milliseconds(model: TorchModel, inputs: list[np.ndarray], device: torch.device, repeats: int) -> float:
    """A batch's time with no phase clocks, whose synchronisations would hide the cascade's own waits."""
    started = time.perf_counter()
    for _ in range(repeats):
        run_module(model, inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000.0 * (time.perf_counter() - started) / repeats


def device_waits(model: TorchModel, inputs: list[np.ndarray], device: torch.device) -> int | None:
    """How many times one batch makes the host wait for the device (torch's sync debug mode warns at
    each); None off CUDA. On a GPU shared by many processes each wait can take a time slice."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_module(model, inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def profile(device: torch.device, precision: TorchPrecision, batch: int, repeats: int, repository: Path) -> dict:
    model = load_built_in(repository, CASCADE_MODEL, device, precision)
    frames = group_frames(batch)
    options = np.tile(np.array(dataclasses.astuple(DetectionDefaults()), np.float32), (batch, 1))
    run_module(model, [frames, options])
    plain_ms = plain_milliseconds(model, [frames, options], device, repeats)
    waits = device_waits(model, [frames, options], device)
    clock = PhaseClock(device)
    for name in TIMED_FUNCTIONS:
        setattr(mtcnn_cascade, name, clock.timed(name, getattr(mtcnn_cascade, name)))
    cascade = model.module
    for name in TIMED_METHODS:
        setattr(cascade, name, clock.timed(name, getattr(cascade, name)))
    for net in ("pnet", "rnet", "onet"):
        module = getattr(cascade, net)
        module.forward = clock.timed(net, module.forward)
    faces = []
    for _ in range(repeats):
        with clock.phase("whole"):
            outputs = run_module(model, [frames, options])
        faces.append(int(outputs[COUNTS].sum()))
    return {
        "device": str(device),
        "precision": precision,
        "batch": batch,
        "repeats": repeats,
        "faces_per_batch": faces,
        "ms_per_batch_untimed_phases": plain_ms,
        "device_waits_per_batch": waits,
        "phases": {
            name: {
                "calls_per_batch": clock.calls[name] / repeats,
                "ms_per_batch": 1000.0 * clock.seconds[name] / repeats,
            }
            for name in sorted(clock.seconds, key=lambda key: -clock.seconds[key])
        },
        "nms_boxes_per_group_max": [
            max(widths, default=0) for widths in clock.nms_widths[: len(clock.nms_widths) // repeats]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=TORCH_PRECISIONS, default="fp16")
    parser.add_argument("--batch", type=int, default=14, help="frames a request (Triton's mean batch was 14)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repository", type=Path, default=Path("triton_models"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    record = profile(torch.device(args.device), args.precision, args.batch, args.repeats, args.repository)
    text = json.dumps(record, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checks, before any benchmark, that the embedded Triton serves the built-in models on this machine's GPU.

`python -m services.bench.gpu_check --out check.json`: starts the embedded tritonserver with the device
chosen as the stack would ("auto"), detects the faces of a packaged photo through it and swaps them,
and compares both with the same code over the ONNX files in onnxruntime on the CPU: the same faces,
and the swapped crops within FP16's reach (PSNR). Writes what it found as JSON and exits non-zero when
the models are not on the GPU or the answers differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.common.media_paths import write_file
from services.common.model_runner import ModelRunner
from services.common.triton_client import TritonClient
from services.triton.local_models import LocalModels
from services.triton.server_process import EmbeddedTriton

MIN_SWAP_PSNR_DB = 40.0


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    error = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


async def swap_photo(models: ModelRunner) -> tuple[int, np.ndarray]:
    """(faces found in the astronaut photo, the swapped crops of its faces with Grace Hopper's face)."""
    from services.cli import sample_media
    from services.detector.face_detector import FaceDetector
    from services.worker.face_aligner import align_face
    from services.worker.face_swapper import CropTransferSwapper

    detector = FaceDetector(models)
    swapper = CropTransferSwapper(models)
    photo, source = sample_media.astronaut_photo(), sample_media.grace_hopper_photo()
    faces = (await detector.detect(photo[None]))[0]
    source_face = (await detector.detect(source[None]))[0][0]
    identity = await swapper.prepare_source(align_face(source, source_face.landmarks).crop)
    crops = np.stack([align_face(photo, face.landmarks).crop for face in faces])
    swapped = (await swapper.swap(crops, identity)).crops
    return len(faces), swapped


async def swap_through_triton(url: str) -> tuple[int, np.ndarray]:
    # The client's channel belongs to the event loop it is made in.
    return await swap_photo(TritonClient(url, timeout_seconds=120))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.gpu_check", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("triton_models"))
    parser.add_argument("--workdir", type=Path, default=Path("build/gpu-check"))
    parser.add_argument("--out", type=Path, default=Path("build/gpu-check/check.json"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    with EmbeddedTriton(args.repository, args.workdir, startup_timeout=600) as triton:
        startup = time.monotonic() - started
        served_faces, served = asyncio.run(swap_through_triton(f"127.0.0.1:{triton.grpc_port}"))
        log_tail = triton.log_path.read_text(errors="replace")[-3000:]
    reference_faces, reference = asyncio.run(swap_photo(LocalModels(args.repository)))
    result: dict[str, Any] = {
        "device": triton.device,
        "device_reason": triton.device_reason,
        "startup_seconds": startup,
        "faces_served": served_faces,
        "faces_onnxruntime": reference_faces,
        "swap_psnr_db": psnr(served, reference) if served.shape == reference.shape else None,
    }
    result["ok"] = bool(
        triton.device == "cuda"
        and served_faces == reference_faces > 0
        and (result["swap_psnr_db"] or 0.0) >= MIN_SWAP_PSNR_DB
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file(args.out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        print(log_tail, file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

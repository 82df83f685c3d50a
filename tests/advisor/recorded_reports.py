"""Job reports as the gateway writes them (with the telemetry `gpu` section) and small test catalogs."""

from __future__ import annotations

from typing import Any

from services.advisor.time_predictor import Calibration, MemoryModel, WorkloadModel
from services.common.gpu_catalog import GIB, GpuCatalog, catalog_from_data

SOURCES = {
    "memory": "test datasheet",
    "fp16_tensor_tflops": "test datasheet",
    "memory_bandwidth_gbps": "test datasheet",
    "video_decoders": "test datasheet",
    "price_per_hour_usd": "test price list",
}


def gpu_entry(
    name: str, memory_gib: float, price: float, tflops: float = 100.0, bandwidth: float = 1000.0
) -> dict[str, Any]:
    return {
        "name": name,
        "nvml_names": [f"NVIDIA {name}"],
        "memory_gib": memory_gib,
        "fp16_tensor_tflops": tflops,
        "memory_bandwidth_gbps": bandwidth,
        "video_decoders": 2,
        "price_per_hour_usd": price,
        "source": dict(SOURCES),
    }


def catalog_of(*entries: dict[str, Any]) -> GpuCatalog:
    return catalog_from_data({"gpus": list(entries)})


def measured_calibration(reference: str, factors: dict[str, float], wall_factor: float = 1.0) -> Calibration:
    """A calibration as if every GPU in `factors` had been measured."""
    return Calibration(
        reference_gpu=reference,
        reference_fp16_tensor_tflops=100.0,
        reference_memory_bandwidth_gbps=1000.0,
        time_factors={reference: 1.0, **factors},
        compute_weight=0.5,
        datasheet_elasticity=1.0,
        wall_factor=wall_factor,
        workload=WorkloadModel(base_ms=2.0, ms_per_megapixel=2.0, ms_per_face=1.0),
        memory=MemoryModel(base_bytes=1.0 * GIB, bytes_per_megapixel=0.5 * GIB, bytes_per_face=0.0),
        measurements=len(factors) + 1,
        note="test",
    )


def job_report(
    job_id: str = "job-1",
    *,
    gpu_model: str | None = "NVIDIA Big",
    memory_peak_bytes: int = 4 * GIB,
    memory_p95_bytes: int | None = None,
    utilization_mean: float = 60.0,
    frames: int = 250,
    faces: int = 250,
    wall_seconds: float = 20.0,
    width: int = 1280,
    height: int = 720,
    stage_ms: dict[str, float] | None = None,
    state: str = "succeeded",
) -> dict[str, Any]:
    stages = stage_ms or {"decode": 10.0, "detect": 20.0, "swap": 30.0, "paste": 15.0, "encode": 25.0}
    report: dict[str, Any] = {
        "job_id": job_id,
        "state": state,
        "selector": "one",
        "target": {
            "uri": "in.mp4",
            "width": width,
            "height": height,
            "fps": 25.0,
            "frames": frames,
            "duration_seconds": frames / 25.0,
            "has_audio": False,
        },
        "output": {"uri": "out.mp4", "frames": frames, "audio_copied": False},
        "frames": frames,
        "faces": faces,
        "frames_with_faces": min(faces, frames),
        "chunks": 2,
        "chunk_attempts": 2,
        "wall_seconds": wall_seconds,
        "fps": frames / wall_seconds,
        "stages": {
            **{
                name: {"seconds": ms * frames / 1000.0, "ms_per_frame": ms, "fps": 1000.0 / ms if ms else 0.0}
                for name, ms in stages.items()
            },
            "join": {"seconds": 0.5},
        },
        "events": [],
        "warnings": [],
        "gpu": {"samples": 0, "gpus": []},
    }
    if gpu_model is not None:
        report["gpu"] = {
            "source": "trend log",
            "samples": 20,
            "gpus": [
                {
                    "node": "node-a",
                    "index": 0,
                    "uuid": "GPU-0",
                    "model": gpu_model,
                    "samples": 20,
                    "utilization_mean_percent": utilization_mean,
                    "utilization_peak_percent": 99.0,
                    "utilization_p95_percent": 95.0,
                    "memory_used_peak_bytes": memory_peak_bytes,
                    "memory_used_p95_bytes": memory_peak_bytes if memory_p95_bytes is None else memory_p95_bytes,
                    "memory_total_bytes": 80 * GIB,
                    "temperature_peak_celsius": 60.0,
                    "power_mean_watts": 200.0,
                }
            ],
        }
    return report

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from services.bench.gpu_bench import (
    STUB_BINARY,
    StackShape,
    WorkerCounts,
    choose_visible_gpus,
    gpu_shares,
    parse_env,
    per_gpu_summary,
    summary_table,
    triton_deltas,
    triton_stubs,
    triton_summary,
    worker_counts,
)
from services.common.job_vocabulary import STAGE_NAMES


def job(clip: str, fps: float) -> dict:
    return {
        "clip": clip,
        "fps": fps,
        "pipeline_fps": fps + 1,
        "cpu_cores_busy": 9.5,
        "ms_per_frame": dict.fromkeys(STAGE_NAMES, 2.0),
        "gpu": {
            "utilisation_mean": 12.0,
            "utilisation_max": 30.0,
            "decoder_utilisation_mean": None,
            "memory_used_max_bytes": 2**31,
        },
    }


def test_env_pairs_are_parsed_and_a_bare_word_is_refused() -> None:
    assert parse_env(["SWAPLINE_WORKER_DEVICE=cpu", "A=b=c"]) == (("SWAPLINE_WORKER_DEVICE", "cpu"), ("A", "b=c"))
    with pytest.raises(argparse.ArgumentTypeError):
        parse_env(["SWAPLINE_WORKER_DEVICE"])


def test_a_shape_is_labelled_with_its_settings() -> None:
    shape = StackShape(8, 2, (("SWAPLINE_WORKER_DEVICE", "cpu"),))
    assert shape.label == "services, 8 worker(s), 2 of each frame service, WORKER_DEVICE=cpu"


def test_summary_has_a_row_per_job_with_its_figures() -> None:
    record = {
        "services": [{"label": "services, 8 worker(s)", "workers": 8, "jobs": [job("one-face", 120.04)]}],
        "in_process": {"concurrency": 8, "jobs": [job("six-people", 40.0)]},
    }
    lines = summary_table(record).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| services, 8 worker(s) | one-face | 120.0 | 121.0 | 12 / 30 | - | 2.0 | 9.5 |")
    assert lines[3].startswith("| one process, 8 chunks at once | six-people | 40.0 |")


def swapper_statistics(inferences: int, executions: int, requests: int, queue_ms: int, infer_ms: int) -> dict:
    """face_swapper's statistics shaped as Triton's JSON: uint64s as strings, zero fields left out."""
    return {
        "name": "face_swapper",
        "version": "1",
        "inference_count": str(inferences),
        "execution_count": str(executions),
        "inference_stats": {
            "success": {"count": str(requests), "ns": "1"},
            "queue": {"count": str(requests), "ns": str(queue_ms * 10**6)},
            # Each request of a batch is charged its batch's whole compute.
            "compute_infer": {"count": str(requests), "ns": str(2 * infer_ms * 10**6)},
        },
        # One entry per batch size, each execution counted once: half of them at 8, half at 32.
        "batch_stats": [
            {"batch_size": "8", "compute_infer": {"count": str(executions // 2), "ns": str(infer_ms * 10**6 // 2)}},
            {"batch_size": "32", "compute_infer": {"count": str(executions // 2), "ns": str(infer_ms * 10**6 // 2)}},
        ],
    }


BEFORE = {"model_stats": [swapper_statistics(100, 10, 20, 40, 100), {"name": "mtcnn_pnet", "version": "1"}]}
AFTER = {
    "model_stats": [
        swapper_statistics(260, 20, 40, 100, 180),
        {"name": "mtcnn_pnet", "version": "1"},
        {
            "name": "mtcnn_cascade",
            "inference_count": "6",
            "execution_count": "2",
            "inference_stats": {"success": {"count": "2"}},
        },
    ]
}


def test_triton_deltas_cover_the_window_per_model_and_leave_idle_models_out() -> None:
    deltas = triton_deltas(BEFORE, AFTER, frames=40)
    assert sorted(deltas) == ["face_swapper", "mtcnn_cascade"]
    swapper = deltas["face_swapper"]
    assert (swapper["inference_count"], swapper["execution_count"], swapper["requests"]) == (160, 10, 20)
    assert swapper["mean_batch"] == 16.0
    # A batched request is charged its batch's compute: per request as long as per execution, not shared out.
    assert swapper["ms_per_request"] == dict(queue=3.0, compute_input=None, compute_infer=8.0, compute_output=None)
    assert swapper["ms_per_execution"] == {"compute_input": None, "compute_infer": 8.0, "compute_output": None}
    assert swapper["ms_per_frame"] == dict(queue=1.5, compute_input=None, compute_infer=2.0, compute_output=None)
    assert deltas["mtcnn_cascade"]["mean_batch"] == 3.0


def test_the_summary_adds_a_line_per_model_for_jobs_with_triton_statistics() -> None:
    with_triton = {**job("one-face", 120.0), "triton": triton_deltas(BEFORE, AFTER, frames=40)}
    record = {"services": [{"label": "services, 8 worker(s)", "workers": 8, "jobs": [with_triton, job("six", 1.0)]}]}
    assert triton_summary(record) == [
        "Triton, services, 8 worker(s), one-face:",
        "  face_swapper: 10 executions, mean batch 16.0 (2.0 requests), queue 3.00 ms/request,"
        " infer 8.00 ms/execution (2.00 ms/frame)",
        "  mtcnn_cascade: 2 executions, mean batch 3.0 (1.0 requests), queue - ms/request,"
        " infer - ms/execution (- ms/frame)",
    ]


def test_triton_stubs_are_found_by_model_and_instance(tmp_path: Path) -> None:
    """Children of this process that look like Triton's stubs: argv[0] the stub, argv[1] the model's model.py."""
    models = ("face_swapper", "face_swapper", "mtcnn_cascade")
    children = []
    for model in models:
        script = tmp_path / "model_repository" / model / "1" / "model.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.touch()
        # tail -f runs until killed and leaves its arguments as given, as the stub's are.
        children.append(
            subprocess.Popen([f"/opt/backends/python/{STUB_BINARY}", str(script), "-f"], executable="/usr/bin/tail")
        )
    try:
        found = triton_stubs(os.getpid())
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert found == {
        "stub-face_swapper-0": children[0].pid,
        "stub-face_swapper-1": children[1].pid,
        "stub-mtcnn_cascade-0": children[2].pid,
    }


WORKER_METRICS = """\
# HELP swapline_worker_frames_total Frames the worker swapped and encoded.
# TYPE swapline_worker_frames_total counter
swapline_worker_frames_total 75.0
swapline_worker_frames_created 1.7e9
# HELP swapline_worker_chunks_total Chunks the worker ended, by outcome.
# TYPE swapline_worker_chunks_total counter
swapline_worker_chunks_total{outcome="succeeded"} 3.0
swapline_worker_chunks_total{outcome="failed"} 1.0
swapline_worker_chunks_created{outcome="succeeded"} 1.7e9
"""


def test_a_workers_frames_and_chunks_are_read_from_its_metrics() -> None:
    assert worker_counts(WORKER_METRICS) == WorkerCounts(frames=75.0, chunks=4.0)
    assert worker_counts("") == WorkerCounts()


def test_each_gpu_gets_its_workers_frames_and_chunks_and_their_shares() -> None:
    before = [WorkerCounts(10, 1), WorkerCounts(0, 0), WorkerCounts(5, 1)]
    after = [WorkerCounts(110, 5), WorkerCounts(150, 6), WorkerCounts(55, 3)]
    shares = gpu_shares([0, 1, 0], before, after)
    assert shares == {
        "0": {"frames": 150, "chunks": 6, "frame_share": 0.5, "chunk_share": 0.5},
        "1": {"frames": 150, "chunks": 6, "frame_share": 0.5, "chunk_share": 0.5},
    }
    lopsided = gpu_shares([0, 1], [WorkerCounts(), WorkerCounts()], [WorkerCounts(300, 9), WorkerCounts(100, 3)])
    assert (lopsided["0"]["frame_share"], lopsided["1"]["frame_share"]) == (0.75, 0.25)


def test_without_a_gpu_or_without_work_there_are_no_shares_to_divide_by() -> None:
    assert gpu_shares([None, None], [WorkerCounts()] * 2, [WorkerCounts(50, 2)] * 2) == {}
    idle = gpu_shares([0, 1], [WorkerCounts()] * 2, [WorkerCounts()] * 2)
    assert idle["1"] == {"frames": 0.0, "chunks": 0.0, "frame_share": 0.0, "chunk_share": 0.0}


def test_visible_gpus_are_set_for_the_whole_stack_in_nvmls_order() -> None:
    environment = {"PATH": "/bin"}
    choose_visible_gpus("1", environment)
    assert environment == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_the_summary_adds_each_gpus_utilisation_and_share() -> None:
    two = {
        **job("one-face", 90.0),
        "gpus": {"0": {"utilisation_mean": 41.0, "utilisation_max": 80.0}, "1": {"utilisation_mean": 39.0}},
        "gpu_shares": {
            "0": {"frames": 260, "chunks": 11, "frame_share": 0.52, "chunk_share": 0.55},
            "1": {"frames": 240, "chunks": 9, "frame_share": 0.48, "chunk_share": 0.45},
        },
    }
    record = {"services": [{"label": "services, 16 worker(s)", "workers": 16, "jobs": [two, job("six-people", 1.0)]}]}
    assert per_gpu_summary(record) == [
        "Per GPU, services, 16 worker(s), one-face:",
        "  GPU 0: util. 41 / 80%, 52% of the frames (260), 55% of the chunks (11)",
        "  GPU 1: util. 39 / -%, 48% of the frames (240), 45% of the chunks (9)",
    ]
    assert per_gpu_summary({"services": [{"workers": 2, "jobs": [job("one-face", 1.0)]}]}) == []

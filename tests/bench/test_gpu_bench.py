import argparse

import pytest

from services.bench.gpu_bench import StackShape, parse_env, summary_table
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

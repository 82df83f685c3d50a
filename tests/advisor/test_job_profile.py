from __future__ import annotations

import copy
from typing import Any

import pytest

from services.advisor.job_profile import profile_from_report, profiles_from_reports
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GIB
from tests.advisor.recorded_reports import job_report


def test_profile_reads_every_field_of_a_gpu_report() -> None:
    report = job_report(
        frames=200,
        faces=300,
        wall_seconds=16.0,
        memory_peak_bytes=6 * GIB,
        memory_p95_bytes=5 * GIB,
        utilization_mean=42.5,
        width=1920,
        height=1080,
    )

    profile = profile_from_report(report)

    assert profile.job_id == "job-1"
    assert profile.gpu_model == "NVIDIA Big"
    assert profile.memory_peak_bytes == 6 * GIB
    assert profile.memory_p95_bytes == 5 * GIB
    assert profile.utilization_mean == 42.5
    assert (profile.width, profile.height, profile.frames) == (1920, 1080, 200)
    assert profile.faces_per_frame == 1.5
    assert profile.wall_seconds == 16.0
    assert profile.gpu_stage_ms == 50.0
    assert profile.cpu_stage_ms == 50.0


def test_a_job_on_several_gpus_is_sized_by_the_gpu_that_held_the_most_memory() -> None:
    report = job_report(memory_peak_bytes=3 * GIB, utilization_mean=20.0)
    second = dict(
        report["gpu"]["gpus"][0],
        index=1,
        model="NVIDIA Other",
        memory_used_peak_bytes=7 * GIB,
        memory_used_p95_bytes=6 * GIB,
        utilization_mean_percent=60.0,
    )
    report["gpu"]["gpus"].append(second)

    profile = profile_from_report(report)

    assert profile.gpu_model == "NVIDIA Other"
    assert profile.memory_peak_bytes == 7 * GIB
    assert profile.utilization_mean == 40.0


@pytest.mark.parametrize("gpu_section", ["absent", "empty"])
def test_a_job_without_gpu_data_profiles_as_a_cpu_run(gpu_section: str) -> None:
    report = job_report(gpu_model=None)
    if gpu_section == "absent":
        del report["gpu"]

    profile = profile_from_report(report)

    assert profile.gpu_model == ""
    assert profile.memory_peak_bytes == 0


def _set(report: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = report
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("frames", -3, "profile field 'frames' must be a positive integer, got -3"),
        ("frames", True, "profile field 'frames' must be a positive integer, got True"),
        ("frames", _DELETE, "profile field 'frames' is missing"),
        ("wall_seconds", 0, "profile field 'wall_seconds' must be a positive number, got 0"),
        ("faces", "many", "profile field 'faces' must be a non-negative integer, got 'many'"),
        ("target.width", 0, "profile field 'target.width' must be a positive integer, got 0"),
        ("target", None, "profile field 'target.width' is missing"),
        (
            "stages.swap.ms_per_frame",
            -1.0,
            "profile field 'stages.swap.ms_per_frame' must be a non-negative number, got -1.0",
        ),
        ("stages.detect", _DELETE, "profile field 'stages.detect' is missing"),
        (
            "gpu.gpus.0.utilization_mean_percent",
            150.0,
            "'gpu.gpus[0].utilization_mean_percent' must be a percentage in [0, 100], got 150.0",
        ),
        (
            "gpu.gpus.0.memory_used_peak_bytes",
            -5,
            "profile field 'gpu.gpus[0].memory_used_peak_bytes' must be a non-negative integer, got -5",
        ),
        (
            "gpu.gpus.0.memory_used_p95_bytes",
            10 * GIB,
            "'gpu.gpus[0].memory_used_p95_bytes' (10737418240) exceeds",
        ),
        ("gpu.gpus.0.model", _DELETE, "profile field 'gpu.gpus[0].model' is missing"),
        ("gpu.gpus", "none", "profile field 'gpu.gpus' must be a list"),
    ],
)
def test_a_malformed_report_is_rejected_naming_the_field(path: str, value: Any, message: str) -> None:
    report = copy.deepcopy(job_report())
    _set(report, path, value)

    with pytest.raises(InvalidArgument) as raised:
        profile_from_report(report)

    assert message in raised.value.message


def test_profiles_from_reports_keeps_the_good_and_names_the_bad() -> None:
    bad = job_report("bad", frames=0)

    profiles, skipped = profiles_from_reports([job_report("good"), bad])

    assert [profile.job_id for profile in profiles] == ["good"]
    assert len(skipped) == 1
    assert skipped[0].startswith("job bad: profile field 'frames'")


def test_null_readings_count_as_unmeasured_and_the_older_key_spelling_is_read() -> None:
    report = job_report(utilization_mean=30.0)
    gpu = report["gpu"]["gpus"][0]
    gpu["utilization_mean"] = gpu.pop("utilization_mean_percent")
    gpu["memory_used_peak_bytes"] = None
    gpu["memory_used_p95_bytes"] = None

    profile = profile_from_report(report)

    assert profile.utilization_mean == 30.0
    assert (profile.memory_peak_bytes, profile.memory_p95_bytes) == (0, 0)
    assert profile.gpu_model == "NVIDIA Big"

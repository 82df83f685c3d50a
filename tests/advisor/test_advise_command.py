"""`swapline advise` (services/cli/advise_command.py) against the in-process advisor and fake gateway."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from services.advisor.advisor_state import AdvisorState
from services.cli import advise_command
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import load_catalog
from swapline.advisor.v1 import advisor_pb2, advisor_pb2_grpc
from tests.advisor.test_servicer import _run


def _report() -> advisor_pb2.FleetReportResponse:
    return advisor_pb2.FleetReportResponse(
        jobs=4,
        rows=[
            advisor_pb2.FleetGpuRow(
                gpu="Big",
                jobs_fitting=4,
                fit_share=1.0,
                mean_predicted_seconds=20.0,
                recommended_cost_usd=0.5,
                jobs_recommended=1,
                as_run_cost_usd=2.0,
                jobs_run=4,
            ),
            advisor_pb2.FleetGpuRow(
                gpu="Small card",
                jobs_fitting=1,
                fit_share=0.25,
                mean_predicted_seconds=80.0,
                recommended_cost_usd=0.1,
                jobs_recommended=1,
            ),
        ],
        as_run_cost_usd=2.0,
        recommended_cost_usd=0.6,
        savings_percent=70.0,
        jobs_compared=2,
        jobs_without_recommendation=2,
        skipped=["job x: profile field 'frames' is missing"],
    )


def test_the_table_aligns_its_columns_and_prints_the_totals() -> None:
    lines = advise_command.fleet_table(_report()).splitlines()

    assert lines[0].split()[:3] == ["GPU", "fits", "jobs"]
    assert len(lines[0]) == len(lines[1]) == len(lines[2]) == len(lines[3])
    assert lines[2].startswith("Big ") and "100% (4/4)" in lines[2] and "$0.500000" in lines[2]
    assert "25% (1/4)" in lines[3] and lines[3].endswith("-")
    assert "savings: 70.0%" in "\n".join(lines)
    assert "2 job(s) fit no GPU within the deadline" in lines
    assert lines[-1] == "skipped job x: profile field 'frames' is missing"


def test_the_table_lists_the_clusters_gpus_only_where_the_advisor_reads_them() -> None:
    report = _report()
    assert "cluster" not in advise_command.fleet_table(report)
    report.cluster.CopyFrom(
        advisor_pb2.ClusterInventory(
            enabled=True,
            gpus=[advisor_pb2.ClusterGpus(summary="8 x NVIDIA-L4 on 2 nodes (L4 in the catalog)")],
            error="the API did not answer in 10 s",
        )
    )
    lines = advise_command.fleet_table(report).splitlines()
    assert lines[-3:] == [
        "the cluster's GPU nodes:",
        "  8 x NVIDIA-L4 on 2 nodes (L4 in the catalog)",
        "  (the latest read failed: the API did not answer in 10 s)",
    ]


def _two_of(gpu: str, **figures: Any) -> advisor_pb2.MultiGpuOption:
    return advisor_pb2.MultiGpuOption(gpu=gpu, gpu_count=2, jobs_fitting=3, **figures)


def test_each_multi_gpu_option_has_a_line_with_its_verdict_or_not_measured() -> None:
    report = _report()
    report.multi_gpu.extend(
        [
            _two_of(
                "L4",
                measured=True,
                scaling=1.85,
                predicted_seconds=41.25,
                cost_usd=0.00125,
                single_gpu="H100",
                single_gpu_cost_usd=0.0025,
                recommended=True,
            ),
            _two_of(
                "T4",
                measured=True,
                scaling=1.5,
                predicted_seconds=80.0,
                cost_usd=0.004,
                single_gpu="L4",
                single_gpu_cost_usd=0.002,
                recommended=False,
            ),
            _two_of("H200", measured=True, scaling=1.9, predicted_seconds=5.0, cost_usd=0.01, recommended=True),
            _two_of("A10G"),
        ]
    )

    lines = advise_command.fleet_table(report).splitlines()

    start = lines.index("several GPUs on one machine against one bigger GPU:")
    assert lines[start + 1 : start + 5] == [
        "  2 x L4: 41.2 s, $0.001250 for 3 job(s) (1.85x one GPU) — cheaper than 1 x H100 ($0.002500)",
        "  2 x T4: 80.0 s, $0.004000 for 3 job(s) (1.50x one GPU) — 1 x L4 ($0.002000) is as cheap or cheaper",
        "  2 x H200: 5.0 s, $0.010000 for 3 job(s) (1.90x one GPU) — faster than any single GPU",
        "  2 x A10G: not measured (no 2-GPU point in the calibration)",
    ]
    assert lines[-1] == "skipped job x: profile field 'frames' is missing"


def test_the_table_has_no_multi_gpu_section_without_options() -> None:
    assert "several GPUs" not in advise_command.fleet_table(_report())


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = advise_command.write_plot(_report(), tmp_path / "plots" / "fleet.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_comes_from_the_advisor_or_is_computed_here() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        here = await advise_command._computed_here(state.settings.gateway_target, 10, 0.0)
        remote = await advise_command._from_advisor(advisor, 10, 0.0)

        assert here.jobs == remote.jobs == 2
        assert list(here.skipped) == list(remote.skipped) != []
        # Computed here with the packaged catalog; the advisor under test has its own small one.
        assert [row.gpu for row in here.rows] == [gpu.name for gpu in load_catalog().gpus]
        assert [row.gpu for row in remote.rows] == [gpu.name for gpu in state.catalog.gpus]
        # Neither calibration has a two-GPU point.
        assert [option.gpu for option in remote.multi_gpu] == ["Big", "Cheap", "Small"]
        assert here.multi_gpu and not any(option.measured for option in (*here.multi_gpu, *remote.multi_gpu))

    _run(scenario)


def test_without_advisor_or_gateway_the_command_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(advise_command.GATEWAY_ENV, raising=False)
    args = argparse.Namespace(advisor="", gateway="", limit=0, deadline=0.0, plot="")

    with pytest.raises(InvalidArgument, match="SWAPLINE_ADVISOR or SWAPLINE_GATEWAY"):
        advise_command.advise(args)


def test_add_parser_registers_advise() -> None:
    parser = argparse.ArgumentParser()
    advise_command.add_parser(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["advise", "--limit", "5", "--deadline", "60", "--plot", "out.png"])

    assert (args.limit, args.deadline, args.plot, args.handler) == (5, 60.0, "out.png", advise_command.advise)

"""`swapline advise`: the advisor's fleet report as a table, and a plot of it.

With --advisor (or SWAPLINE_ADVISOR) the report comes from a running AdvisorService; without, it is
computed here from the gateway's jobs with the packaged GPU catalog and calibration, so the command
also works against a bare gateway (`swapline up`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from services.advisor.fleet_report import build_fleet_report
from services.advisor.gateway_jobs import GatewayJobs
from services.advisor.job_profile import profiles_from_reports
from services.advisor.servicer import fleet_report_to_proto
from services.advisor.settings import DEFAULT_HEADROOM_FRACTION, DEFAULT_JOB_LIMIT
from services.advisor.time_predictor import load_calibration
from services.common.errors import InvalidArgument, from_rpc_error
from services.common.gpu_catalog import load_catalog
from services.common.grpc_channel import client_security_from_env, open_channel
from swapline.advisor.v1 import advisor_pb2, advisor_pb2_grpc
from swapline.jobs.v1 import jobs_pb2_grpc

ADVISOR_ENV = "SWAPLINE_ADVISOR"
GATEWAY_ENV = "SWAPLINE_GATEWAY"
_CALL_TIMEOUT_SECONDS = 60.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `advise` on the CLI's subparsers (argparse's _SubParsersAction)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "advise", help="print the fleet report: which GPU sizes the recent jobs need and what they would cost"
    )
    parser.add_argument(
        "--advisor",
        default=os.environ.get(ADVISOR_ENV, ""),
        help=f"advisor address host:port (default: ${ADVISOR_ENV}; empty: compute it here)",
    )
    parser.add_argument("--limit", type=int, default=0, help="most recent succeeded jobs to consider (0: default)")
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds each job must finish within (0: none)")
    parser.add_argument("--plot", default="", help="write a bar chart of the report to this PNG")
    parser.set_defaults(handler=advise)
    return parser


async def _from_advisor(address: str, limit: int, deadline: float) -> advisor_pb2.FleetReportResponse:
    channel = open_channel(address, client_security_from_env())
    try:
        stub = advisor_pb2_grpc.AdvisorServiceStub(channel)
        request = advisor_pb2.FleetReportRequest(limit=limit, deadline_seconds=deadline)
        return await stub.FleetReport(request, timeout=_CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    finally:
        await channel.close()


async def _computed_here(gateway: str, limit: int, deadline: float) -> advisor_pb2.FleetReportResponse:
    channel = open_channel(gateway, client_security_from_env())
    try:
        jobs = GatewayJobs(jobs_pb2_grpc.JobServiceStub(channel))
        reports, unreadable = await jobs.succeeded_reports(limit or DEFAULT_JOB_LIMIT)
    finally:
        await channel.close()
    profiles, malformed = profiles_from_reports(reports)
    report = build_fleet_report(
        profiles,
        load_catalog(),
        load_calibration(),
        DEFAULT_HEADROOM_FRACTION,
        deadline,
        [*unreadable, *malformed],
    )
    return fleet_report_to_proto(report)


def fleet_table(report: advisor_pb2.FleetReportResponse) -> str:
    header = ("GPU", "fits jobs", "mean predicted", "jobs recommended", "cost as recommended", "cost as run")
    rows = [
        (
            row.gpu,
            f"{100.0 * row.fit_share:.0f}% ({row.jobs_fitting}/{report.jobs})",
            f"{row.mean_predicted_seconds:.1f} s" if row.jobs_fitting else "-",
            str(row.jobs_recommended),
            f"${row.recommended_cost_usd:.6f}",
            f"${row.as_run_cost_usd:.6f}" if row.jobs_run else "-",
        )
        for row in report.rows
    ]
    widths = [max(len(line[column]) for line in (header, *rows)) for column in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))])

    totals = [
        "",
        f"jobs: {report.jobs}; compared (ran on a priced catalog GPU, got a recommendation): {report.jobs_compared}",
        f"cost as run: ${report.as_run_cost_usd:.6f}; as recommended: ${report.recommended_cost_usd:.6f}; "
        f"savings: {report.savings_percent:.1f}%",
    ]
    if report.jobs_unpriced:
        totals.append(f"{report.jobs_unpriced} job(s) ran on a GPU the catalog does not price, or on none")
    if report.jobs_without_recommendation:
        totals.append(f"{report.jobs_without_recommendation} job(s) fit no GPU within the deadline")
    totals += multi_gpu_lines(report.multi_gpu)
    totals += [f"skipped {entry}" for entry in report.skipped]
    totals += cluster_lines(report.cluster)
    return "\n".join([line(header), line(tuple("-" * width for width in widths)), *map(line, rows), *totals])


def multi_gpu_line(option: advisor_pb2.MultiGpuOption) -> str:
    """E.g. "2 x L4 24GB: 41.2 s, $0.001234 for 3 job(s) (1.85x one GPU) — cheaper than 1 x H100 80GB SXM ($0.002345)";
    "not measured" where the calibration has no point for that many GPUs."""
    several = f"{option.gpu_count} x {option.gpu}"
    if not option.measured:
        return f"{several}: not measured (no {option.gpu_count}-GPU point in the calibration)"
    figures = (
        f"{several}: {option.predicted_seconds:.1f} s, ${option.cost_usd:.6f} for {option.jobs_fitting} job(s) "
        f"({option.scaling:.2f}x one GPU)"
    )
    if not option.single_gpu:
        return f"{figures} — faster than any single GPU"
    single = f"1 x {option.single_gpu} (${option.single_gpu_cost_usd:.6f})"
    verdict = f"cheaper than {single}" if option.recommended else f"{single} is as cheap or cheaper"
    return f"{figures} — {verdict}"


def multi_gpu_lines(options: Sequence[advisor_pb2.MultiGpuOption]) -> list[str]:
    """Several GPUs of one model on one machine against the cheapest single GPU as fast, over the same jobs."""
    if not options:
        return []
    lines = [f"  {multi_gpu_line(option)}" for option in options]
    return ["", "several GPUs on one machine against one bigger GPU:", *lines]


def cluster_lines(cluster: advisor_pb2.ClusterInventory) -> list[str]:
    """The GPUs the cluster's nodes have, where the advisor reads them: beside the catalog's rows, which they do not
    filter (node pools that scale to zero list no nodes)."""
    if not cluster.enabled:
        return []
    lines = ["", "the cluster's GPU nodes:" if cluster.gpus else "the cluster's nodes have no GPUs"]
    lines += [f"  {group.summary}" for group in cluster.gpus]
    if cluster.error:
        lines.append(f"  (the latest read failed: {cluster.error})")
    return lines


def write_plot(report: advisor_pb2.FleetReportResponse, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.gpu for row in report.rows]
    figure, (costs, shares) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    positions = range(len(names))
    costs.bar(
        [p - 0.2 for p in positions],
        [row.recommended_cost_usd for row in report.rows],
        0.4,
        label="as recommended",
    )
    costs.bar([p + 0.2 for p in positions], [row.as_run_cost_usd for row in report.rows], 0.4, label="as run")
    costs.set_title(f"cost per GPU (savings {report.savings_percent:.1f}%)")
    costs.set_ylabel("USD")
    costs.legend()
    shares.bar(list(positions), [100.0 * row.fit_share for row in report.rows], color="tab:green")
    shares.set_title(f"share of the {report.jobs} jobs each GPU fits")
    shares.set_ylabel("%")
    shares.set_ylim(0, 100)
    for axes in (costs, shares):
        axes.set_xticks(list(positions), names, rotation=30, ha="right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def advise(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise InvalidArgument(f"--limit must not be negative, got {args.limit}")
    if args.advisor:
        report = asyncio.run(_from_advisor(args.advisor, args.limit, args.deadline))
    else:
        gateway = getattr(args, "gateway", "") or os.environ.get(GATEWAY_ENV, "")
        if not gateway:
            raise InvalidArgument(f"no advisor and no gateway: set {ADVISOR_ENV} or {GATEWAY_ENV} (or pass them)")
        report = asyncio.run(_computed_here(gateway, args.limit, args.deadline))
    print(fleet_table(report))
    if args.plot:
        print(f"plot written to {write_plot(report, Path(args.plot))}")
    return 0

"""`swapline batch`: every source face into every target of a directory, as one batch; run it again to resume.

Outputs are named <target stem>__<source stem><target suffix>. An output already there counts only when it
is complete (the target's frame count and duration, or an image of the target's size); a partial one is
redone. The batch is submitted under an idempotency key derived from the inputs (paths, sizes, modification
times, options), so running the same command again, after Ctrl-C, a killed command or a gateway restart,
resumes the same batch rather than making another. As each job succeeds its output is downloaded. A pair
whose output can no longer be had from the batch (skipped when first submitted and gone since, or deleted
by the gateway's retention) is redone by a job of its own, under a key derived from the batch's, so that
re-running never duplicates it either. The output directory also gets batch_report.csv and .json, a chart
of the batch's throughput (batch_throughput.png), and the gateway's own batch report and GPU trend.

The batch runs on SWAPLINE_GATEWAY (or --gateway) when set: Ctrl-C leaves it running there. Otherwise an
embedded stack runs it in <output>/.swapline-stack: stopping the command stops the stack, and the next run
resumes from the store it left. That directory is removed once every pair is done, unless --workdir named it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from services.cli import commands
from services.cli.batch_inputs import (
    BatchOptions,
    BatchPairName,
    InputFile,
    batch_key,
    check_output_directory,
    pair_names,
    redo_key,
    scan_sources,
    scan_targets,
)
from services.cli.batch_outputs import OutputCheck, check_output, probe_target, remove_partial_files, skip_reason
from services.cli.batch_report import (
    BatchSummary,
    PairOutcome,
    PairState,
    ThroughputSample,
    draw_throughput_chart,
    reports_batch_done,
    write_report_csv,
    write_report_json,
)
from services.cli.batch_resume import ResumeLog, load_resume
from services.cli.job_client import TERMINAL_STATES, JobClient, state_name
from services.cli.job_follower import Reconnecting, Reconnector, follow_batch, follow_job
from services.cli.progress_bar import ProgressBar
from services.common.errors import NotFound, SwaplineError
from services.common.job_vocabulary import selector_mode_to_proto
from services.common.media_info import MediaInfo
from services.common.media_paths import temporary_path
from swapline.encoder.v1 import encoder_pb2
from swapline.jobs.v1 import jobs_pb2

STACK_DIRNAME = ".swapline-stack"
REPORT_CSV = "batch_report.csv"
REPORT_JSON = "batch_report.json"
THROUGHPUT_CHART = "batch_throughput.png"
SERVER_ARTIFACTS: tuple[tuple[str, jobs_pb2.Artifact, str], ...] = (
    ("server report", jobs_pb2.ARTIFACT_REPORT, "batch_server_report.json"),
    ("GPU trend chart", jobs_pb2.ARTIFACT_GPU_TREND_CHART, "batch_gpu_trend.png"),
    ("GPU trend samples", jobs_pb2.ARTIFACT_GPU_TREND_CSV, "batch_gpu_trend.csv"),
)
# Redo jobs for one pair in one run, at most: a redo whose output is gone too before it is fetched is redone.
MAX_REDOS_PER_PAIR = 3
EXIT_INTERRUPTED = 130
# The ends `--retry-failed` submits again.
RETRIED_STATES = frozenset({jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
_JOB_OUTCOMES: dict[int, PairState] = {
    jobs_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    jobs_pb2.JOB_STATE_FAILED: "failed",
    jobs_pb2.JOB_STATE_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class BatchPlan:
    """The batch as this run finds it: inputs, pairs and their outputs' names, the key, what is already done."""

    output_dir: Path
    targets: tuple[InputFile, ...]
    sources: tuple[InputFile, ...]
    # What the gateway is told each target is: a URI under its media root, or "" for an upload.
    target_uris: tuple[str, ...]
    target_media: tuple[MediaInfo | str, ...]
    pairs: tuple[BatchPairName, ...]
    # The outputs' state when the run began, by pair.
    checks: tuple[OutputCheck, ...]
    options: BatchOptions
    key: str

    def output(self, pair: BatchPairName) -> Path:
        return self.output_dir / pair.output_name

    def index(self, target_index: int, source_index: int) -> int:
        return target_index * len(self.sources) + source_index

    def check(self, pair: BatchPairName) -> OutputCheck:
        return check_output(self.output(pair), self.target_media[pair.target_index])


def batch_options(args: argparse.Namespace) -> BatchOptions:
    return BatchOptions(
        selector=args.selector,
        reference=InputFile.at(Path(args.reference)) if args.reference else None,
        crf=args.crf,
        preset=args.preset,
        swapper=args.swapper,
        detector=args.detector,
        target_uri=args.target_uri,
    )


def plan_batch(args: argparse.Namespace) -> BatchPlan:
    """Scans the inputs, names the outputs, derives the key and checks which outputs are complete already."""
    output_dir = Path(args.output)
    targets_dir = Path(args.targets)
    sources = scan_sources([Path(source) for source in args.sources])
    targets = scan_targets(targets_dir)
    check_output_directory(output_dir, targets_dir, sources)
    if args.reference and not Path(args.reference).is_file():
        raise NotFound(f"reference image {args.reference!r} does not exist")
    options = batch_options(args)
    target_media = tuple(probe_target(target.path) for target in targets)
    pairs = pair_names(targets, sources)
    return BatchPlan(
        output_dir=output_dir,
        targets=targets,
        sources=sources,
        target_uris=tuple(str(targets_dir / target.path.name) if args.target_uri else "" for target in targets),
        target_media=target_media,
        pairs=pairs,
        checks=tuple(check_output(output_dir / pair.output_name, target_media[pair.target_index]) for pair in pairs),
        options=options,
        key=batch_key(targets, sources, options, output_dir),
    )


def batch_spec(plan: BatchPlan) -> jobs_pb2.BatchSpec:
    """Every target with every source (pairs left empty); the pairs complete on disk are sent as skipped."""
    options = plan.options
    return jobs_pb2.BatchSpec(
        targets=[
            jobs_pb2.BatchTarget(uri=uri)
            if uri
            else jobs_pb2.BatchTarget(filename=target.path.name, size_bytes=target.size_bytes)
            for target, uri in zip(plan.targets, plan.target_uris, strict=True)
        ],
        sources=[
            jobs_pb2.BatchSource(name=source.path.stem, image=source.path.read_bytes()) for source in plan.sources
        ],
        skipped=[
            jobs_pb2.BatchSkip(
                pair=jobs_pb2.BatchPair(target_index=pair.target_index, source_index=pair.source_index),
                reason=skip_reason(check),
            )
            for pair, check in zip(plan.pairs, plan.checks, strict=True)
            if check.complete
        ],
        selector=selector_mode_to_proto(options.selector),
        reference_image=options.reference.path.read_bytes() if options.reference is not None else b"",
        encode=encoder_pb2.EncodeSettings(crf=options.crf, preset=options.preset),
        swapper=options.swapper,
        detector=options.detector,
        idempotency_key=plan.key,
        name=plan.output_dir.absolute().name,
    )


def job_seconds(job: jobs_pb2.Job) -> float:
    if not job.HasField("started_at") or not job.HasField("finished_at"):
        return 0.0
    return max((job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9, 0.0)


def pair_outcome(
    plan: BatchPlan, pair: BatchPairName, job: jobs_pb2.Job | None, check: OutputCheck, no_job_reason: str = ""
) -> PairOutcome:
    """How a pair ended: by its job when one answers for it, but succeeded only with a complete output on disk,
    and skipped (whatever its job did) when the output on disk was complete without it."""
    state: PairState
    if job is not None and job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        state = "succeeded" if check.complete else "failed"
        detail = "" if check.complete else f"the output is not complete: {check.detail}"
    elif check.complete:
        state, detail = "skipped", skip_reason(check)
    elif job is not None:
        state = _JOB_OUTCOMES.get(job.state, "failed")
        detail = job.error.message or f"the job ended {state_name(job.state)}"
    else:
        state, detail = "failed", f"{no_job_reason or 'no job ran for it'}; the output is {check.detail}"
    seconds = job_seconds(job) if job is not None and state != "skipped" else 0.0
    frames = job.frames_done if job is not None and state != "skipped" else check.frames
    return PairOutcome(
        target=plan.targets[pair.target_index].path.name,
        source=plan.sources[pair.source_index].path.name,
        output=pair.output_name,
        state=state,
        frames=frames,
        fps=frames / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        job_id=job.id if job is not None else "",
        detail=detail,
    )


def sample_of(event: jobs_pb2.BatchEvent) -> ThroughputSample:
    counts = event.counts
    return ThroughputSample(
        at=event.at.ToNanoseconds() / 1e9 if event.HasField("at") else time.time(),
        frames_done=event.frames_done,
        jobs_ended=counts.succeeded + counts.failed + counts.cancelled,
        jobs_failed=counts.failed,
        fps=event.fps,
    )


@dataclass
class BatchRun:
    """One run of the command against a gateway: submit or resume, follow, download, redo, report."""

    client: JobClient
    plan: BatchPlan
    bar: ProgressBar | None
    per_job: bool
    log: ResumeLog
    # Pairs whose job failed or was cancelled get a job of their own, once per such job.
    retry_failed: bool = False
    batch_id: str = ""
    # The job answering for each pair (a batch job, or the job that redoes it), by pair index.
    _job_of_pair: dict[int, str] = field(default_factory=dict)
    # Each ended job as read when it ended; those whose end has been dealt with (output saved, or redone).
    _jobs: dict[str, jobs_pb2.Job] = field(default_factory=dict)
    _handled: set[str] = field(default_factory=set)
    # The outputs as last checked: when the run began, or after a download.
    _checks: dict[int, OutputCheck] = field(default_factory=dict)
    _redos: dict[int, int] = field(default_factory=dict)
    _ended_seen: int = -1

    def __post_init__(self) -> None:
        self._checks = dict(enumerate(self.plan.checks))

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.note(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def reconnector(self) -> Reconnector:
        def reconnecting(retry: Reconnecting) -> None:
            self.say(
                f"gateway unavailable for {retry.outage_seconds:.0f} s ({retry.error.message[:80]});"
                f" reconnecting in {retry.retry_in_seconds:.1f} s"
            )

        return Reconnector(reconnecting)

    def submit_or_resume(self, known_batch_id: str) -> jobs_pb2.Batch:
        """The batch of a previous run when the gateway still has it; else a submission under the key."""
        if known_batch_id:
            try:
                batch = self.reconnector().call(lambda: self.client.get_batch(known_batch_id))
            except NotFound:
                self.say(f"the gateway no longer has batch {known_batch_id}; submitting it again")
            else:
                self.say(f"resuming batch {batch.id}")
                return batch
        uploads = [
            None if uri else target.path for target, uri in zip(self.plan.targets, self.plan.target_uris, strict=True)
        ]
        batch = self.client.submit_batch(batch_spec(self.plan), uploads)
        self.say(f"batch {batch.id} submitted")
        return batch

    def run(self, known_batch_id: str) -> BatchSummary:
        batch = self.submit_or_resume(known_batch_id)
        self.batch_id = batch.id
        if batch.id != known_batch_id:
            self.log.samples.clear()
        self.log.started(batch.id)
        for entry in batch.entries:
            index = self.plan.index(entry.pair.target_index, entry.pair.source_index)
            if entry.skipped and not self._checks[index].complete:
                self.redo(index, "skipped", "skipped when the batch was submitted, and its output is not complete now")
        final = follow_batch(self.client, batch.id, self.on_event, self.reconnector())
        if self.bar is not None:
            self.bar.finish()
        self.log.save()
        self.collect(final)
        if self.retry_failed:
            self.retry_failures()
        self.finish_redos()
        return BatchSummary(final.id, final.name, self.plan.key, self.outcomes(final))

    def on_event(self, event: jobs_pb2.BatchEvent) -> None:
        sample = sample_of(event)
        self.log.add(sample)
        if self.bar is not None:
            self.bar.update_batch(event)
        if sample.jobs_ended != self._ended_seen:
            self.handle_ended(self.client.get_batch(self.batch_id).entries)
            self._ended_seen = sample.jobs_ended

    def handle_ended(self, entries: Iterable[jobs_pb2.BatchEntry]) -> None:
        for entry in entries:
            if entry.job_id and entry.state in TERMINAL_STATES and entry.job_id not in self._handled:
                index = self.plan.index(entry.pair.target_index, entry.pair.source_index)
                self._job_of_pair.setdefault(index, entry.job_id)
                self.job_ended(index, self.client.get(entry.job_id))

    def job_ended(self, index: int, job: jobs_pb2.Job) -> None:
        """Saves a succeeded job's output unless the one on disk is complete already; a lost output is redone.

        UNAVAILABLE leaves the job to be dealt with again: the download starts over.
        """
        self._jobs[job.id] = job
        pair = self.plan.pairs[index]
        if job.state == jobs_pb2.JOB_STATE_SUCCEEDED and not self._checks[index].complete:
            try:
                commands.save_output(self.client, job, self.plan.output(pair))
            except NotFound as error:
                self._handled.add(job.id)
                self.redo(index, job.id, f"its output is gone from the gateway ({error.message[:80]})")
                return
            self._checks[index] = self.plan.check(pair)
        self._handled.add(job.id)
        if self.per_job:
            self.say(job_line(pair_outcome(self.plan, pair, job, self._checks[index])))

    def redo(self, index: int, replaced: str, why: str) -> None:
        """A job of its own for the pair, keyed by the batch key, the pair and what it replaces."""
        self._redos[index] = self._redos.get(index, 0) + 1
        if self._redos[index] > MAX_REDOS_PER_PAIR:
            return
        pair = self.plan.pairs[index]
        target, uri = self.plan.targets[pair.target_index], self.plan.target_uris[pair.target_index]
        options = self.plan.options
        job = self.client.submit(
            self.plan.sources[pair.source_index].path.read_bytes(),
            target_path=None if uri else target.path,
            target_uri=uri,
            selector=options.selector,
            reference_image=options.reference.path.read_bytes() if options.reference is not None else b"",
            crf=options.crf,
            preset=options.preset,
            swapper=options.swapper,
            detector=options.detector,
            idempotency_key=redo_key(self.plan.key, pair, replaced),
        )
        self._job_of_pair[index] = job.id
        self.say(f"redoing {pair.output_name} as job {job.id}: {why}")

    def retry_failures(self) -> None:
        """Each pair whose job ended failed or cancelled, and whose output is not complete, is redone; its key
        names the job it replaces, so re-running never makes a second retry of the same failure."""
        for index, job_id in list(self._job_of_pair.items()):
            job = self._jobs.get(job_id)
            if job is None or job.state not in RETRIED_STATES or self._checks[index].complete:
                continue
            reason = job.error.message or state_name(job.state)
            self.redo(index, job.id, f"its job {job.id} ended {state_name(job.state)} ({reason[:80]})")

    def collect(self, final: jobs_pb2.Batch) -> None:
        """Deals with the ends not yet dealt with (the last jobs'), from one listing of the batch's jobs."""
        reconnector = self.reconnector()
        listed = {job.id: job for job in reconnector.call(lambda: list(self.client.jobs(batch_id=final.id)))}
        for entry in final.entries:
            if entry.job_id and entry.job_id not in self._handled:
                index = self.plan.index(entry.pair.target_index, entry.pair.source_index)
                self._job_of_pair.setdefault(index, entry.job_id)
                job = listed.get(entry.job_id) or reconnector.call(partial(self.client.get, entry.job_id))
                reconnector.call(partial(self.job_ended, index, job))

    def finish_redos(self) -> None:
        """Follows each redo job to its end and saves its output; one whose output is gone is redone again."""
        reconnector = self.reconnector()
        while pending := [
            (index, job_id) for index, job_id in self._job_of_pair.items() if job_id not in self._handled
        ]:
            for index, job_id in pending:
                bar = self.bar
                job = follow_job(self.client, job_id, bar.update if bar is not None else _ignore, reconnector)
                if bar is not None:
                    bar.finish()
                reconnector.call(partial(self.job_ended, index, job))

    def outcomes(self, final: jobs_pb2.Batch) -> tuple[PairOutcome, ...]:
        skip_reasons = {
            self.plan.index(entry.pair.target_index, entry.pair.source_index): entry.skip_reason
            for entry in final.entries
            if entry.skipped
        }
        return tuple(
            pair_outcome(
                self.plan,
                pair,
                self._jobs.get(self._job_of_pair.get(index, "")),
                self._checks[index],
                f"skipped: {skip_reasons[index]}" if index in skip_reasons else "",
            )
            for index, pair in enumerate(self.plan.pairs)
        )


def _ignore(_: object) -> None:
    return None


def job_line(outcome: PairOutcome) -> str:
    if outcome.state == "succeeded":
        return (
            f"{outcome.output}: succeeded, {outcome.frames} frames in {outcome.seconds:.1f} s ({outcome.fps:.1f} fps)"
        )
    return f"{outcome.output}: {outcome.state}: {outcome.detail}"


def fetch_server_artifacts(client: JobClient, batch_id: str, output_dir: Path) -> None:
    """The gateway's own batch report and GPU trend; a gateway without them gives a warning, not a failure."""
    for what, artifact, filename in SERVER_ARTIFACTS:
        destination = output_dir / filename
        try:
            client.fetch_batch_artifact(batch_id, artifact, temporary_path(destination)).replace(destination)
        except SwaplineError as error:
            print(f"warning: no batch {what}: {error.code.name}: {error.message[:120]}", file=sys.stderr)


def write_reports(output_dir: Path, summary: BatchSummary, samples: list[ThroughputSample]) -> None:
    write_report_csv(output_dir / REPORT_CSV, summary.outcomes)
    write_report_json(output_dir / REPORT_JSON, summary)
    heading = f"throughput of batch {summary.name}" + (f" ({summary.batch_id})" if summary.batch_id else "")
    draw_throughput_chart(output_dir / THROUGHPUT_CHART, samples, heading)


def print_summary(summary: BatchSummary, output_dir: Path) -> None:
    counts = ", ".join(f"{count} {state}" for state, count in summary.counts().items())
    print(f"batch {summary.batch_id or '(nothing to run)'}: {counts}; outputs in {output_dir}")
    print(f"report: {output_dir / REPORT_CSV}, {output_dir / REPORT_JSON}, chart {output_dir / THROUGHPUT_CHART}")
    for outcome in summary.not_done():
        print(f"{outcome.state}: {outcome.output}: {outcome.detail}", file=sys.stderr)


def nothing_to_run(plan: BatchPlan) -> BatchSummary:
    """Every output is complete already: the report says so, and no gateway is needed."""
    outcomes = tuple(pair_outcome(plan, pair, None, check) for pair, check in zip(plan.pairs, plan.checks, strict=True))
    return BatchSummary("", plan.output_dir.absolute().name, plan.key, outcomes)


def resume_hint(args: argparse.Namespace, batch_id: str) -> str:
    where = (
        f"batch {batch_id or '(not yet submitted)'} keeps running on the gateway"
        if args.gateway
        else "the embedded stack stops with this command"
    )
    return f"interrupted: {where}; run the same command again to resume it"


def run_batch(args: argparse.Namespace) -> int:
    plan = plan_batch(args)
    output_dir = plan.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(output_dir)
    complete = sum(check.complete for check in plan.checks)
    print(
        f"{len(plan.targets)} targets x {len(plan.sources)} sources = {len(plan.pairs)} outputs;"
        f" {complete} complete already, {len(plan.pairs) - complete} to make",
        file=sys.stderr,
    )
    if complete == len(plan.pairs):
        if reports_batch_done(output_dir / REPORT_JSON, plan.key):
            print(f"every output is complete; the reports in {output_dir} stand")
            return 0
        summary = nothing_to_run(plan)
        write_reports(output_dir, summary, [])
        print_summary(summary, output_dir)
        return 0
    resumed = load_resume(output_dir, plan.key)
    log = ResumeLog(output_dir, plan.key, samples=list(resumed.samples) if resumed is not None else [])
    stack_dir = output_dir / STACK_DIRNAME
    with commands.client_for(args, default_workdir=stack_dir) as client:
        run = BatchRun(client, plan, None if args.quiet else ProgressBar(), args.per_job, log, args.retry_failed)
        try:
            summary = run.run(resumed.batch_id if resumed is not None else "")
        except KeyboardInterrupt:
            log.save()
            print(f"\n{resume_hint(args, run.batch_id)}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        write_reports(output_dir, summary, log.samples)
        fetch_server_artifacts(client, summary.batch_id, output_dir)
    print_summary(summary, output_dir)
    if summary.not_done():
        return 1
    if not args.gateway and not args.workdir:
        shutil.rmtree(stack_dir, ignore_errors=True)
    return 0

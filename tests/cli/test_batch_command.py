"""`swapline batch` against an in-process JobService that keeps batches as the proto's comments say a gateway
does: one batch per idempotency key, each job's output the uploaded target itself (so it is complete)."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.cli import __main__ as cli
from services.cli import batch_command, job_client, sample_media
from services.cli.batch_inputs import BatchPairName, redo_key
from services.cli.batch_resume import RESUME_FILENAME, load_resume
from services.cli.job_client import JobClient
from services.common.errors import NotFound
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc

SUCCEEDED, FAILED = jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED


@dataclass
class FakeGateway(jobs_pb2_grpc.JobServiceServicer):
    """Batches by key; every job ends at once: SUCCEEDED, or FAILED for targets named in `failing`."""

    failing: set[str] = field(default_factory=set)
    drop_submissions: int = 0
    submitted_keys: list[str] = field(default_factory=list)
    specs: list[jobs_pb2.BatchSpec] = field(default_factory=list)
    uploads: list[dict[int, bytes]] = field(default_factory=list)
    batches: dict[str, jobs_pb2.Batch] = field(default_factory=dict)
    batch_of_key: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, jobs_pb2.Job] = field(default_factory=dict)
    job_of_key: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _job(self, batch_id: str, target_name: str, output: bytes) -> jobs_pb2.Job:
        job_id = f"job-{len(self.jobs) + 1}"
        failed = target_name in self.failing
        job = jobs_pb2.Job(
            id=job_id,
            state=FAILED if failed else SUCCEEDED,
            batch_id=batch_id,
            frames_total=10,
            frames_done=0 if failed else 10,
            output_uri="" if failed else f"outputs/{job_id}{Path(target_name).suffix}",
        )
        job.started_at.FromSeconds(100)
        job.finished_at.FromSeconds(102)
        if failed:
            job.error.message = "no face found in the target"
        else:
            self.outputs[job_id] = output
        self.jobs[job_id] = job
        return job

    def SubmitBatch(
        self, request_iterator: Iterator[jobs_pb2.SubmitBatchRequest], context: grpc.ServicerContext
    ) -> jobs_pb2.Batch:
        messages = list(request_iterator)
        spec = messages[0].spec
        with self.lock:
            self.submitted_keys.append(spec.idempotency_key)
            if self.drop_submissions:
                self.drop_submissions -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            self.specs.append(spec)
            pieces: dict[int, bytes] = {}
            for message in messages[1:]:
                pieces[message.target_piece.target_index] = (
                    pieces.get(message.target_piece.target_index, b"") + message.target_piece.data
                )
            self.uploads.append(pieces)
            if spec.idempotency_key in self.batch_of_key:
                return self.batches[self.batch_of_key[spec.idempotency_key]]
            batch_id = f"batch-{len(self.batches) + 1}"
            skipped = {(skip.pair.target_index, skip.pair.source_index): skip.reason for skip in spec.skipped}
            batch = jobs_pb2.Batch(
                id=batch_id,
                name=spec.name,
                state=jobs_pb2.BATCH_STATE_SUCCEEDED,
                target_names=[target.filename for target in spec.targets],
            )
            for target_index, target in enumerate(spec.targets):
                assert len(pieces[target_index]) == target.size_bytes
                for source_index in range(len(spec.sources)):
                    entry = batch.entries.add()
                    entry.pair.target_index, entry.pair.source_index = target_index, source_index
                    if (target_index, source_index) in skipped:
                        entry.skipped, entry.skip_reason = True, skipped[(target_index, source_index)]
                        continue
                    job = self._job(batch_id, target.filename, pieces[target_index])
                    entry.job_id, entry.state = job.id, job.state
            self.batches[batch_id] = batch
            self.batch_of_key[spec.idempotency_key] = batch_id
            return batch

    def GetBatch(self, request: jobs_pb2.GetBatchRequest, context: grpc.ServicerContext) -> jobs_pb2.Batch:
        if request.batch_id not in self.batches:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such batch")
        return self.batches[request.batch_id]

    def CancelBatch(self, request: jobs_pb2.CancelBatchRequest, context: grpc.ServicerContext) -> jobs_pb2.Batch:
        if request.batch_id not in self.batches:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such batch")
        self.batches[request.batch_id].state = jobs_pb2.BATCH_STATE_CANCELLED
        return self.batches[request.batch_id]

    def WatchBatch(self, request: jobs_pb2.WatchBatchRequest, context: grpc.ServicerContext) -> Iterator[object]:
        batch = self.batches[request.batch_id]
        jobs = [self.jobs[entry.job_id] for entry in batch.entries if entry.job_id]
        counts = jobs_pb2.BatchCounts(
            jobs_total=len(jobs),
            succeeded=sum(job.state == SUCCEEDED for job in jobs),
            failed=sum(job.state == FAILED for job in jobs),
            skipped=sum(entry.skipped for entry in batch.entries),
        )
        yield jobs_pb2.BatchEvent(batch_id=batch.id, state=jobs_pb2.BATCH_STATE_RUNNING, frames_total=10 * len(jobs))
        yield jobs_pb2.BatchEvent(
            batch_id=batch.id,
            state=jobs_pb2.BATCH_STATE_FAILED if counts.failed else jobs_pb2.BATCH_STATE_SUCCEEDED,
            counts=counts,
            frames_done=10 * counts.succeeded,
            frames_total=10 * len(jobs),
            fps=5.0,
        )

    def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=[job for job in self.jobs.values() if job.batch_id == request.batch_id])

    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:
        return self.jobs[request.job_id]

    def SubmitJob(
        self, request_iterator: Iterator[jobs_pb2.SubmitJobRequest], context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        messages = list(request_iterator)
        spec = messages[0].spec
        with self.lock:
            if spec.idempotency_key not in self.job_of_key:
                target = b"".join(message.target_chunk for message in messages[1:])
                self.job_of_key[spec.idempotency_key] = self._job("", spec.target_filename, target).id
            return self.jobs[self.job_of_key[spec.idempotency_key]]

    def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[object]:
        job = self.jobs[request.job_id]
        yield jobs_pb2.JobEvent(job_id=job.id, state=job.state, frames_done=job.frames_done, frames_total=10)

    def FetchArtifact(self, request: jobs_pb2.FetchArtifactRequest, context: grpc.ServicerContext) -> Iterator[object]:
        if request.job_id not in self.outputs:
            context.abort(grpc.StatusCode.NOT_FOUND, "the output was deleted by retention")
        data = self.outputs[request.job_id]
        for start in range(0, len(data), 4096):
            yield jobs_pb2.ArtifactChunk(data=data[start : start + 4096])

    def FetchBatchArtifact(
        self, request: jobs_pb2.FetchBatchArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[object]:
        if request.artifact != jobs_pb2.ARTIFACT_REPORT:
            context.abort(grpc.StatusCode.NOT_FOUND, "no GPU trend for this batch")
        yield jobs_pb2.ArtifactChunk(data=json.dumps({"batch_id": request.batch_id}).encode())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for name, photo in (("a.mp4", sample_media.astronaut_photo()), ("b.mov", sample_media.grace_hopper_photo())):
        video = sample_media.make_face_video(root / "clips" / "b.mp4", photo, 1.0, (160, 96), 10, audio=False)
        video.rename(root / "clips" / name)
    (root / "faces").mkdir()
    (root / "faces" / "x.png").write_bytes(sample_media.encode_png(sample_media.grace_hopper_photo()[:64, :64]))
    (root / "faces" / "y.png").write_bytes(sample_media.encode_png(sample_media.astronaut_photo()[:64, :64]))
    return root


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeGateway, str]]:
    monkeypatch.setattr(job_client, "SUBMIT_RETRY_PAUSES_SECONDS", (0.0, 0.0))
    fake = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def batch(address: str, inputs: Path, output: Path, *extra: str) -> int:
    arguments = ["--gateway", address, "batch", "--sources", str(inputs / "faces"), "--targets"]
    return cli.main([*arguments, str(inputs / "clips"), "--output", str(output), "--quiet", *extra])


def report_rows(output: Path) -> dict[str, dict[str, str]]:
    return {row["output"]: row for row in csv.DictReader((output / "batch_report.csv").open())}


def test_a_batch_skips_complete_outputs_redoes_partial_ones_and_reports_every_pair(
    gateway: tuple[FakeGateway, str], inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = gateway
    fake.drop_submissions = 1
    output = tmp_path / "out"
    output.mkdir()
    shutil.copy(inputs / "clips" / "a.mp4", output / "a__x.mp4")
    sample_media.make_truncated_mp4(inputs / "clips" / "a.mp4", output / "a__y.mp4")

    assert batch(address, inputs, output, "--per-job") == 0

    # Dropped once (UNAVAILABLE) and sent again with the same key; each target uploaded whole.
    assert len(fake.submitted_keys) == 2 and len(set(fake.submitted_keys)) == 1
    spec = fake.specs[0]
    assert [(target.filename, target.size_bytes) for target in spec.targets] == [
        ("a.mp4", (inputs / "clips" / "a.mp4").stat().st_size),
        ("b.mov", (inputs / "clips" / "b.mov").stat().st_size),
    ]
    assert fake.uploads[0][1] == (inputs / "clips" / "b.mov").read_bytes()
    assert [source.name for source in spec.sources] == ["x", "y"] and not spec.pairs
    assert [(skip.pair.target_index, skip.pair.source_index) for skip in spec.skipped] == [(0, 0)]
    assert spec.skipped[0].reason == "output exists and is complete: 10 frames, 1.00 s"
    assert spec.name == "out" and spec.idempotency_key.startswith("batch-")

    for name, target in (("a__y.mp4", "a.mp4"), ("b__x.mov", "b.mov"), ("b__y.mov", "b.mov")):
        assert (output / name).read_bytes() == (inputs / "clips" / target).read_bytes()
    rows = report_rows(output)
    assert {name: row["state"] for name, row in rows.items()} == {
        "a__x.mp4": "skipped",
        "a__y.mp4": "succeeded",
        "b__x.mov": "succeeded",
        "b__y.mov": "succeeded",
    }
    assert rows["b__x.mov"]["frames"] == "10" and rows["b__x.mov"]["fps"] == "5.00"
    assert json.loads((output / "batch_server_report.json").read_text()) == {"batch_id": "batch-1"}
    assert (output / "batch_throughput.png").stat().st_size > 0
    assert not [path.name for path in output.iterdir() if path.name.endswith(".part")]
    streams = capsys.readouterr()
    assert "b__x.mov: succeeded, 10 frames in 2.0 s (5.0 fps)" in streams.err
    assert "warning: no batch GPU trend chart: NOT_FOUND" in streams.err
    assert load_resume(output, spec.idempotency_key) is not None


def test_a_rerun_resumes_the_batch_and_redoes_outputs_lost_since_once(
    gateway: tuple[FakeGateway, str], inputs: Path, tmp_path: Path
) -> None:
    fake, address = gateway
    output = tmp_path / "out"
    output.mkdir()
    shutil.copy(inputs / "clips" / "a.mp4", output / "a__x.mp4")
    assert batch(address, inputs, output) == 0
    key = fake.specs[0].idempotency_key
    jobs_after_first_run = len(fake.jobs)

    # The output skipped at submission is deleted, and so is one the batch made, whose artifact retention took.
    (output / "a__x.mp4").unlink()
    (output / "b__y.mov").unlink()
    lost = fake.batches["batch-1"].entries[3].job_id
    del fake.outputs[lost]
    assert batch(address, inputs, output) == 0

    # The batch was read back, not submitted again; each lost pair was redone by one job of its own.
    assert len(fake.specs) == 1
    assert set(fake.job_of_key) == {
        redo_key(key, BatchPairName(0, 0, "a__x.mp4"), "skipped"),
        redo_key(key, BatchPairName(1, 1, "b__y.mov"), lost),
    }
    assert len(fake.jobs) == jobs_after_first_run + 2
    assert (output / "b__y.mov").read_bytes() == (inputs / "clips" / "b.mov").read_bytes()
    rows = report_rows(output)
    assert (
        rows["a__x.mp4"]["state"] == "succeeded"
        and rows["a__x.mp4"]["job_id"] == fake.job_of_key[redo_key(key, BatchPairName(0, 0, "a__x.mp4"), "skipped")]
    )

    # Lost again: the same keys, so the same jobs, and no new one.
    (output / "a__x.mp4").unlink()
    assert batch(address, inputs, output) == 0
    assert len(fake.jobs) == jobs_after_first_run + 2 and (output / "a__x.mp4").exists()
    # Nothing left to do: the reports of the runs that did it stay as they are.
    report = (output / "batch_report.csv").read_bytes()
    assert batch("127.0.0.1:9", inputs, output) == 0
    assert (output / "batch_report.csv").read_bytes() == report


def test_a_finished_batch_runs_again_without_a_gateway(inputs: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    for target, names in (("a.mp4", ("a__x.mp4", "a__y.mp4")), ("b.mov", ("b__x.mov", "b__y.mov"))):
        for name in names:
            shutil.copy(inputs / "clips" / target, output / name)
    # No gateway at this address: nothing may be asked of one.
    assert batch("127.0.0.1:9", inputs, output) == 0
    assert {row["state"] for row in report_rows(output).values()} == {"skipped"}


def test_failed_jobs_fail_the_command_and_are_named(
    gateway: tuple[FakeGateway, str], inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = gateway
    fake.failing = {"b.mov"}
    assert batch(address, inputs, tmp_path / "out") == 1
    rows = report_rows(tmp_path / "out")
    assert rows["b__x.mov"]["state"] == "failed" and rows["b__x.mov"]["detail"] == "no face found in the target"
    assert rows["a__x.mp4"]["state"] == "succeeded"
    assert "failed: b__y.mov: no face found in the target" in capsys.readouterr().err


def test_retry_failed_redoes_each_failed_pair_once(
    gateway: tuple[FakeGateway, str], inputs: Path, tmp_path: Path
) -> None:
    fake, address = gateway
    output = tmp_path / "out"
    fake.failing = {"b.mov"}
    assert batch(address, inputs, output) == 1
    # A plain re-run gets the same batch and the same failures; with --retry-failed the failed pairs run again.
    assert batch(address, inputs, output) == 1
    assert fake.job_of_key == {}
    fake.failing = set()
    assert batch(address, inputs, output, "--retry-failed") == 0
    rows = report_rows(output)
    assert {row["state"] for row in rows.values()} == {"succeeded"}
    assert len(fake.job_of_key) == 2 and rows["b__x.mov"]["job_id"] in fake.job_of_key.values()
    assert (output / "b__y.mov").read_bytes() == (inputs / "clips" / "b.mov").read_bytes()
    assert batch(address, inputs, output, "--retry-failed") == 0
    assert len(fake.job_of_key) == 2


def test_ctrl_c_leaves_the_batch_to_resume_and_exits_130(
    gateway: tuple[FakeGateway, str],
    inputs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, address = gateway

    def interrupted(run: batch_command.BatchRun, event: jobs_pb2.BatchEvent) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_command.BatchRun, "on_event", interrupted)
    output = tmp_path / "out"
    assert batch(address, inputs, output) == 130
    assert "batch batch-1 keeps running on the gateway; run the same command again" in capsys.readouterr().err
    record = load_resume(output, fake.specs[0].idempotency_key)
    assert record is not None and record.batch_id == "batch-1"
    assert (output / RESUME_FILENAME).exists() and not (output / "batch_report.csv").exists()


def test_the_client_cancels_a_batch_by_id(gateway: tuple[FakeGateway, str]) -> None:
    fake, address = gateway
    fake.batches["batch-9"] = jobs_pb2.Batch(id="batch-9", state=jobs_pb2.BATCH_STATE_RUNNING)
    with JobClient(address) as client:
        assert client.cancel_batch("batch-9").state == jobs_pb2.BATCH_STATE_CANCELLED
        with pytest.raises(NotFound):
            client.cancel_batch("batch-10")

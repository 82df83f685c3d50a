"""A blocking client of the gateway's JobService, for the CLI, tests and benchmarks."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from services.common.errors import SwaplineError, error_for_code_value, from_rpc_error
from services.common.grpc_channel import CA_FILE_ENV, TOKEN_ENV, bearer_metadata, channel_options
from services.common.job_vocabulary import SelectorMode, selector_mode_to_proto
from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES
from services.common.token_file import read_secret_file
from swapline.encoder.v1 import encoder_pb2
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc

UPLOAD_CHUNK_BYTES = 1024 * 1024
# A submission the gateway did not answer (UNAVAILABLE: not reached, or the connection dropped) is sent again,
# under the same idempotency key, after these pauses: a retry never makes a second job.
SUBMIT_RETRY_PAUSES_SECONDS = (0.5, 2.0)
# The page size `list` asks for; the gateway caps it at 1000.
LIST_PAGE_SIZE = 500

TERMINAL_STATES = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
BATCH_TERMINAL_STATES = frozenset(
    {jobs_pb2.BATCH_STATE_SUCCEEDED, jobs_pb2.BATCH_STATE_FAILED, jobs_pb2.BATCH_STATE_CANCELLED}
)

ResultT = TypeVar("ResultT")


def state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _upload_requests(spec: jobs_pb2.JobSpec, target: Path | None) -> Iterator[jobs_pb2.SubmitJobRequest]:
    yield jobs_pb2.SubmitJobRequest(spec=spec)
    if target is None:
        return
    with target.open("rb") as stream:
        while chunk := stream.read(UPLOAD_CHUNK_BYTES):
            yield jobs_pb2.SubmitJobRequest(target_chunk=chunk)


def _batch_upload_requests(
    spec: jobs_pb2.BatchSpec, uploads: Sequence[Path | None]
) -> Iterator[jobs_pb2.SubmitBatchRequest]:
    """The spec, then each uploaded target's bytes in pieces, target by target (BatchSpec.targets' order)."""
    yield jobs_pb2.SubmitBatchRequest(spec=spec)
    for index, upload in enumerate(uploads):
        if upload is None:
            continue
        with upload.open("rb") as stream:
            while data := stream.read(UPLOAD_CHUNK_BYTES):
                yield jobs_pb2.SubmitBatchRequest(target_piece=jobs_pb2.BatchTargetPiece(target_index=index, data=data))


class JobClient:
    """Every call carries `token` (a tenant's) and turns a failed RPC into the domain error of the same code.

    TLS when `ca_file` names the CA that signed the gateway's certificate; plaintext otherwise.
    """

    def __init__(
        self, target: str, timeout_seconds: float = 60.0, token: str = "", ca_file: Path | None = None
    ) -> None:
        options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
        if ca_file is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            roots = read_secret_file(ca_file, CA_FILE_ENV, "")
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._timeout = timeout_seconds
        # Metadata on each call works the same on plaintext and TLS channels (call credentials need TLS).
        self._metadata = bearer_metadata(token) if token else None
        self._sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_env(
        cls, target: str, timeout_seconds: float = 60.0, environ: Mapping[str, str] | None = None
    ) -> JobClient:
        """Token from SWAPLINE_TOKEN, CA from SWAPLINE_CA_FILE (TLS when set)."""
        source = os.environ if environ is None else environ
        ca_file = source.get(CA_FILE_ENV, "").strip()
        return cls(target, timeout_seconds, source.get(TOKEN_ENV, "").strip(), Path(ca_file) if ca_file else None)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def submit(
        self,
        source_image: bytes,
        target_path: Path | None = None,
        target_uri: str = "",
        selector: SelectorMode = "one",
        reference_image: bytes = b"",
        crf: int = 0,
        preset: str = "",
        swapper: str = "",
        detector: str = "",
        idempotency_key: str = "",
    ) -> jobs_pb2.Job:
        """Uploads `target_path`, or names `target_uri` under the gateway's media root.

        The submission carries `idempotency_key`, a new UUID when empty, so each call makes at most one job:
        when the gateway cannot be reached or the call is cut off (UNAVAILABLE), it is sent again with the
        same key, and a gateway that had already accepted it returns the same job.
        """
        spec = jobs_pb2.JobSpec(
            source_image=source_image,
            target_uri=target_uri,
            target_filename=target_path.name if target_path is not None else "",
            selector=selector_mode_to_proto(selector),
            reference_image=reference_image,
            encode=encoder_pb2.EncodeSettings(crf=crf, preset=preset),
            swapper=swapper,
            detector=detector,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
        )
        return self._resent_while_unavailable(
            lambda: self._stub.SubmitJob(_upload_requests(spec, target_path), timeout=None, metadata=self._metadata)
        )

    def submit_batch(self, spec: jobs_pb2.BatchSpec, uploads: Sequence[Path | None]) -> jobs_pb2.Batch:
        """Sends `spec`, then the bytes of each target that `uploads` names (None: the target is a URI).

        `spec` must carry its idempotency key: a submission cut off (UNAVAILABLE) is sent again whole, and a
        gateway that had accepted it returns the same batch.
        """
        return self._resent_while_unavailable(
            lambda: self._stub.SubmitBatch(_batch_upload_requests(spec, uploads), timeout=None, metadata=self._metadata)
        )

    def _resent_while_unavailable(self, send: Callable[[], ResultT]) -> ResultT:
        pauses = iter(SUBMIT_RETRY_PAUSES_SECONDS)
        while True:
            try:
                return send()
            except grpc.RpcError as error:
                pause = next(pauses, None)
                if pause is None or not hasattr(error, "code") or error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(error) from None
            self._sleep(pause)

    def get(self, job_id: str) -> jobs_pb2.Job:
        try:
            return self._stub.GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        try:
            return self._stub.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def get_batch(self, batch_id: str) -> jobs_pb2.Batch:
        try:
            return self._stub.GetBatch(
                jobs_pb2.GetBatchRequest(batch_id=batch_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def cancel_batch(self, batch_id: str) -> jobs_pb2.Batch:
        try:
            return self._stub.CancelBatch(
                jobs_pb2.CancelBatchRequest(batch_id=batch_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def list(self, limit: int = 50) -> list[jobs_pb2.Job]:
        """The newest `limit` jobs, following the gateway's pages as far as needed."""
        jobs: list[jobs_pb2.Job] = []
        if limit <= 0:
            return jobs
        for job in self.jobs(page_size=min(limit, LIST_PAGE_SIZE)):
            jobs.append(job)
            if len(jobs) >= limit:
                break
        return jobs

    def jobs(
        self, state: int = jobs_pb2.JOB_STATE_UNSPECIFIED, page_size: int = LIST_PAGE_SIZE, batch_id: str = ""
    ) -> Iterator[jobs_pb2.Job]:
        """Every job (of `state`, of batch `batch_id` when set), newest first, a page at a time (next_page_token)."""
        token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(
                limit=page_size,
                state=state,  # type: ignore[arg-type]
                page_token=token,
                batch_id=batch_id,
            )
            try:
                response = self._stub.ListJobs(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
            yield from response.jobs
            token = response.next_page_token
            if not token:
                return

    def watch(self, job_id: str) -> Iterator[jobs_pb2.JobEvent]:
        try:
            yield from self._stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def watch_batch(self, batch_id: str) -> Iterator[jobs_pb2.BatchEvent]:
        try:
            yield from self._stub.WatchBatch(jobs_pb2.WatchBatchRequest(batch_id=batch_id), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def fetch(self, job_id: str, artifact: jobs_pb2.Artifact, destination: Path) -> Path:
        """Writes the artifact to `destination` (a file path) and returns it."""
        request = jobs_pb2.FetchArtifactRequest(job_id=job_id, artifact=artifact)
        return _write_chunks(
            destination,
            lambda: self._stub.FetchArtifact(request, timeout=self._timeout * 10, metadata=self._metadata),
        )

    def fetch_batch_artifact(self, batch_id: str, artifact: jobs_pb2.Artifact, destination: Path) -> Path:
        """Writes the batch's report or GPU trend chart or CSV to `destination` and returns it."""
        request = jobs_pb2.FetchBatchArtifactRequest(batch_id=batch_id, artifact=artifact)
        return _write_chunks(
            destination,
            lambda: self._stub.FetchBatchArtifact(request, timeout=self._timeout * 10, metadata=self._metadata),
        )


def _write_chunks(destination: Path, open_stream: Callable[[], Iterable[jobs_pb2.ArtifactChunk]]) -> Path:
    """The streamed chunks into `destination`, through a .part file renamed once the stream has ended."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with partial.open("wb") as stream:
            for chunk in open_stream():
                stream.write(chunk.data)
    except grpc.RpcError as error:
        partial.unlink(missing_ok=True)
        raise from_rpc_error(error) from None
    partial.replace(destination)
    return destination


def job_error(job: jobs_pb2.Job) -> SwaplineError | None:
    """The failure a finished job carries, as the domain error of its code."""
    if job.state != jobs_pb2.JOB_STATE_FAILED:
        return None
    return error_for_code_value(job.error.code, job.error.message or "job failed")

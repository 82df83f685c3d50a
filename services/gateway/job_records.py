"""The gateway's domain records: jobs, their chunks, the probed target, and the allowed-value sets."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from services.common.face_model_catalog import BUILT_IN_MODELS, JobModels
from services.common.job_vocabulary import SelectorMode
from services.common.media_info import MediaInfo

JobState = Literal["QUEUED", "RUNNING", "JOINING", "SUCCEEDED", "FAILED", "CANCELLED"]
ChunkState = Literal["PENDING", "LEASED", "DONE", "FAILED", "CANCELLED"]
ArtifactKind = Literal["output", "report", "gpu_trend_chart", "gpu_trend_csv"]

JOB_STATES: tuple[JobState, ...] = typing.get_args(JobState)
CHUNK_STATES: tuple[ChunkState, ...] = typing.get_args(ChunkState)

# Jobs whose chunks may still be leased.
LIVE_JOB_STATES: frozenset[JobState] = frozenset({"QUEUED", "RUNNING"})
ENDED_JOB_STATES: frozenset[JobState] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
UNFINISHED_JOB_STATES: tuple[JobState, ...] = ("QUEUED", "RUNNING", "JOINING")
JOINING_ONLY: tuple[JobState, ...] = ("JOINING",)
# Chunks that are not finished one way or the other.
OPEN_CHUNK_STATES: frozenset[ChunkState] = frozenset({"PENDING", "LEASED"})


@dataclass(frozen=True)
class EncodeOptions:
    crf: int = 0
    preset: str = ""


@dataclass(frozen=True)
class JobError:
    """A failure as carried to clients: a numeric gRPC status code and a message."""

    code: int
    message: str


@dataclass(frozen=True)
class JobRequest:
    """A submitted spec; the target is target_uri or else an upload named by target_filename."""

    source_image: bytes
    target_uri: str
    target_filename: str
    selector: SelectorMode
    reference_image: bytes
    encode: EncodeOptions
    # The names as sent, checked when the job is validated; empty means the built-in model.
    swapper: str = ""
    detector: str = ""
    # Empty: none. A retry with the same key gets the job the first submission created (job_idempotency.py).
    idempotency_key: str = ""


@dataclass(frozen=True)
class JoinOutcome:
    output_uri: str
    frames: int
    audio_copied: bool
    join_seconds: float


@dataclass(frozen=True)
class JobRecord:
    id: str
    # The tenant the job belongs to; only its callers (and internal ones) see the job.
    tenant: str
    state: JobState
    selector: SelectorMode
    # Relative to the media root (a tenant's own area included); clients see it relative to their area.
    target_uri: str
    output_uri: str
    # The images live in media storage; a lease reads them, nothing else does. Empty: no reference.
    source_image_uri: str
    reference_image_uri: str
    encode: EncodeOptions
    target: MediaInfo | None
    frames_total: int
    chunks_total: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: JobError | None = None
    join: JoinOutcome | None = None
    report_json: str = ""
    # Derived from the chunks when read from the store.
    chunks_done: int = 0
    frames_done: int = 0
    models: JobModels = BUILT_IN_MODELS
    # The tenant's key for the submission that created the job (empty: none), and the fingerprint of that
    # submission's request; only accepted jobs hold a key. Both go when retention deletes the job.
    idempotency_key: str = ""
    payload_fingerprint: str = ""
    # The batch the job belongs to; empty for a job submitted on its own (which the scheduler runs first).
    batch_id: str = ""


@dataclass(frozen=True)
class BatchTargetRequest:
    """A target of a submitted batch: `uri` under the tenant's area, or an upload of `filename`, `size_bytes` long."""

    uri: str
    filename: str
    size_bytes: int

    @property
    def named(self) -> str:
        return self.uri or self.filename


@dataclass(frozen=True)
class BatchSourceRequest:
    name: str
    image: bytes


@dataclass(frozen=True)
class BatchPair:
    target_index: int
    source_index: int


@dataclass(frozen=True)
class BatchRequest:
    """A submitted batch spec. pairs empty: every target with every source, targets outermost."""

    targets: tuple[BatchTargetRequest, ...]
    sources: tuple[BatchSourceRequest, ...]
    pairs: tuple[BatchPair, ...]
    # Pairs not to run, with the client's reason.
    skipped: tuple[tuple[BatchPair, str], ...]
    selector: SelectorMode
    reference_image: bytes
    encode: EncodeOptions
    swapper: str = ""
    detector: str = ""
    idempotency_key: str = ""
    name: str = ""

    def all_pairs(self) -> tuple[BatchPair, ...]:
        if self.pairs:
            return self.pairs
        return tuple(
            BatchPair(target, source) for target in range(len(self.targets)) for source in range(len(self.sources))
        )


@dataclass(frozen=True)
class BatchEntry:
    """A pair of a batch, targets[target_index] with sources[source_index]: its job, or why it was skipped."""

    target_index: int
    source_index: int
    # Empty when skipped.
    job_id: str = ""
    skip_reason: str = ""


@dataclass(frozen=True)
class BatchRecord:
    """A batch as stored: fixed when submitted, except cancelled_at. Its jobs' states live in their own rows."""

    id: str
    tenant: str
    name: str
    created_at: float
    # Names as the spec gave them (a URI under the tenant's area, or an upload's filename), by index.
    target_names: tuple[str, ...]
    source_names: tuple[str, ...]
    entries: tuple[BatchEntry, ...]
    cancelled_at: float | None = None
    idempotency_key: str = ""
    payload_fingerprint: str = ""

    @property
    def job_ids(self) -> tuple[str, ...]:
        return tuple(entry.job_id for entry in self.entries if entry.job_id)


@dataclass(frozen=True)
class JobSummary:
    """What retention needs of a stored job: whose it is and whether, and when, it ended."""

    id: str
    tenant: str
    state: JobState
    finished_at: float | None


@dataclass(frozen=True)
class BatchSummary:
    """What retention needs of a stored batch: whose it is, its age, and whether any of its jobs is left."""

    id: str
    tenant: str
    created_at: float
    has_jobs: bool


@dataclass(frozen=True)
class TenantStorage:
    """A tenant's stored media in bytes, as last measured plus what it uploaded since, and its limit.

    max_bytes 0: no limit. The store keeps one row under DEFAULT_STORAGE_TENANT for tenants without one.
    """

    tenant: str
    used_bytes: int
    max_bytes: int

    def is_full(self, adding_bytes: int = 0) -> bool:
        return self.max_bytes > 0 and self.used_bytes + adding_bytes >= self.max_bytes


# Not a valid tenant name (TENANT_NAME), so it never meets a real tenant's row.
DEFAULT_STORAGE_TENANT = ""


@dataclass(frozen=True)
class RetrySchedule:
    """How a failed chunk goes back to the queue: not leased before not_before, its run of failures so far."""

    not_before: float
    failing_since: float
    failure_streak: int


@dataclass(frozen=True)
class StalledJob:
    """A running job whose leased chunks made no progress for stalled_seconds of leased time."""

    job_id: str
    stalled_seconds: float
    # The leased chunk that has gone longest without progress; None if the lease ended meanwhile.
    chunk: ChunkRecord | None


@dataclass(frozen=True)
class FaceCountChange:
    frame_index: int
    faces: int


@dataclass(frozen=True)
class ChunkStats:
    """What a worker measured on one chunk; stage_seconds is keyed by StageName."""

    frames: int
    faces: int
    frames_with_faces: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    face_count_changes: tuple[FaceCountChange, ...] = ()
    warnings: tuple[str, ...] = ()
    started_at_unix: float = 0.0
    finished_at_unix: float = 0.0
    # Swapper requests run again on the FP32 twin because the FP16 answer held NaN or Inf.
    fp32_fallbacks: int = 0


@dataclass(frozen=True)
class PlannedChunk:
    index: int
    start_frame: int
    seek_pts: int
    frame_count: int
    segment_uri: str


@dataclass(frozen=True)
class ChunkRecord:
    job_id: str
    index: int
    state: ChunkState
    start_frame: int
    seek_pts: int
    frame_count: int
    segment_uri: str
    # Leases granted so far; the lease handed out carries this count.
    attempts: int = 0
    lease_id: str = ""
    lease_expires_at: float = 0.0
    worker_id: str = ""
    frames_done: int = 0
    stage: str = ""
    faces: int = 0
    stats: ChunkStats | None = None
    last_error: JobError | None = None
    # A chunk given back after a failure is not leased again before this time (backoff).
    not_before: float = 0.0
    # When the current run of failures began (None: the last attempt made progress or none failed),
    # and how many failures it holds: the retry budget and the backoff count from these.
    failing_since: float | None = None
    failure_streak: int = 0
    # When the current lease last made progress (frames rising), or was granted.
    progress_at: float = 0.0

"""Fuzzing the public API on the real stack: mutated requests get clean statuses, never INTERNAL, and nothing dies.

Requests are built as bytes, so they can be wrong at any level: protobuf fields holding garbage,
strings with NUL bytes or a megabyte long, unknown enum values (legal on the wire, hence the casts),
bad encode settings, malformed uploads, and messages that are not protobuf at all. Jobs that happen
to be valid are cancelled at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import grpc
import pytest

from services.cli import sample_media
from services.cli.embedded_stack import EmbeddedStack
from services.common.grpc_server import ServiceBinding
from services.common.server_settings import ServerSettings
from services.common.tenant_context import LOCAL_TENANT
from services.gateway.tenant_areas import in_tenant_area
from swapline.encoder.v1 import encoder_pb2
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.decoder.in_process_server import serving
from tests.e2e.job_helpers import wait_for_end

SEED = 20261201
SUBMIT_CASES = 1000
OTHER_CASES = 300
# Enough calls in flight to keep the gateway busy on two cores without queueing behind each other.
CONCURRENT_CALLS = 8
CALL_TIMEOUT_SECONDS = 60.0
SERVICE = "/swapline.jobs.v1.JobService/"
SPEC_FIELDS = ("source", "uri", "upload", "filename", "selector", "reference", "crf", "preset")
FUZZ_TARGET = "fuzz/target.mp4"
# A message may name the problem and quote the start of a value; anything longer echoes input whole.
MAX_DETAILS_CHARACTERS = 1000


@dataclass(frozen=True)
class FuzzCase:
    kind: str
    method: str
    messages: list[bytes]


@dataclass(frozen=True)
class Outcome:
    kind: str
    code: str
    details: str
    seconds: float
    job_id: str = ""


@dataclass(frozen=True)
class Assets:
    face_png: bytes
    video: bytes
    still_png: bytes
    text: bytes


def identity(data: bytes) -> bytes:
    return data


class RawJobService:
    """JobService methods that send bytes as they are, so a request may be anything, with the tenant's token."""

    def __init__(self, channel: grpc.Channel, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)
        self._submit = channel.stream_unary(
            SERVICE + "SubmitJob", request_serializer=identity, response_deserializer=jobs_pb2.Job.FromString
        )
        self._unary = {
            name: channel.unary_unary(SERVICE + name, request_serializer=identity, response_deserializer=identity)
            for name in ("GetJob", "CancelJob", "ListJobs")
        }
        self._stream = {
            name: channel.unary_stream(SERVICE + name, request_serializer=identity, response_deserializer=identity)
            for name in ("WatchJob", "FetchArtifact")
        }
        self.stub = jobs_pb2_grpc.JobServiceStub(channel)

    def call(self, case: FuzzCase) -> Outcome:
        started = time.perf_counter()
        code, details, job_id = self._send(case.method, case.messages)
        return Outcome(case.kind, code, details, time.perf_counter() - started, job_id)

    def _send(self, method: str, messages: Sequence[bytes]) -> tuple[str, str, str]:
        """(status code name, details, id of the job a SubmitJob created)."""
        try:
            if method == "SubmitJob":
                job = self._submit(iter(messages), timeout=CALL_TIMEOUT_SECONDS, metadata=self.metadata)
                return "OK", "", job.id
            if method in self._unary:
                self._unary[method](messages[0], timeout=CALL_TIMEOUT_SECONDS, metadata=self.metadata)
            else:
                for _ in self._stream[method](messages[0], timeout=CALL_TIMEOUT_SECONDS, metadata=self.metadata):
                    pass
        except grpc.RpcError as error:
            return error.code().name, error.details() or "", ""
        return "OK", "", ""

    def cancel(self, job_id: str) -> None:
        """Cancels an accepted job, unless its few frames were already done."""
        try:
            self.stub.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_SECONDS, metadata=self.metadata
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise


def stack_channel(stack: EmbeddedStack) -> tuple[grpc.Channel, list[tuple[str, str]]]:
    """A channel to the gateway and the metadata of a valid tenant token, when the stack asks for one."""
    credentials = stack.credentials
    if credentials is None:
        return grpc.insecure_channel(stack.gateway_address), []
    roots = credentials.ca_file.read_bytes()
    channel = grpc.secure_channel(stack.gateway_address, grpc.ssl_channel_credentials(roots))
    return channel, [("authorization", f"Bearer {credentials.token(credentials.first_tenant)}")]


def stack_tenant(stack: EmbeddedStack) -> str:
    return LOCAL_TENANT if stack.credentials is None else stack.credentials.first_tenant


# --- mutations -------------------------------------------------------------------------------------------------


def random_bytes(rng: random.Random, most: int = 4096) -> bytes:
    return rng.randbytes(rng.randrange(most + 1))


def flipped(rng: random.Random, data: bytes, flips: int = 16) -> bytes:
    """`data` with random bytes overwritten past its first 16, so the format is still recognised."""
    mutable = bytearray(data)
    for _ in range(rng.randrange(1, flips + 1)):
        position = rng.randrange(min(16, len(data) - 1), len(data))
        mutable[position] = rng.randrange(256)
    return bytes(mutable)


def png_header(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def random_text(rng: random.Random, most: int = 300) -> str:
    alphabet = "abcXYZ019._-/\\:?*%&'\" ~é字🙂\x00\x01\n\t\x7f\u202e"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(most + 1)))


def bad_image(rng: random.Random, assets: Assets) -> bytes:
    choices: list[Callable[[], bytes]] = [
        lambda: random_bytes(rng),
        lambda: assets.face_png[: rng.randrange(len(assets.face_png))],
        lambda: flipped(rng, assets.face_png),
        lambda: png_header(rng.randrange(7000, 65536), rng.randrange(7000, 65536)),
        lambda: png_header(0, rng.randrange(100)),
        lambda: b"GIF89a" + random_bytes(rng, 64),
        lambda: b"\xff\xd8\xff" + random_bytes(rng, 256),
        lambda: b"RIFF\x00\x00\x00\x00WEBPVP8X" + random_bytes(rng, 32),
        lambda: b"BM" + random_bytes(rng, 64),
        lambda: b"II*\x00" + random_bytes(rng, 64),
        lambda: assets.text,
        lambda: assets.video[:4096],
    ]
    return rng.choice(choices)()


def bad_uri(rng: random.Random) -> str:
    choices: list[Callable[[], str]] = [
        lambda: random_text(rng),
        lambda: FUZZ_TARGET.replace("/", rng.choice(["\x00", "/\x00/", "\n", "\x1b"]), 1),
        lambda: "a/" * rng.randrange(500, 600_000),
        lambda: "x" * rng.randrange(256, 600) + ".mp4",
        lambda: "../" * rng.randrange(1, 40) + "etc/passwd",
        lambda: rng.choice(["/etc/passwd", "file:///etc/shadow", "s3://bucket/clip.mp4", "http://example.com/a"]),
        lambda: rng.choice([".", "/", "fuzz", "uploads", "work", "outputs", "tenants", "swapline.db", "%00"]),
        lambda: FUZZ_TARGET[: rng.randrange(len(FUZZ_TARGET))],
        lambda: FUZZ_TARGET + random_text(rng, 8),
        lambda: "".join(
            chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(40)
        ),
    ]
    return rng.choice(choices)()


def bad_upload(rng: random.Random, assets: Assets) -> list[bytes]:
    """Upload pieces: truncated and corrupted media, garbage, empty and tiny pieces."""
    choices: list[Callable[[], list[bytes]]] = [
        lambda: [assets.video[: rng.randrange(len(assets.video))]],
        lambda: [flipped(rng, assets.video, 64)],
        lambda: [assets.video[: len(assets.video) // 2], random_bytes(rng)],
        lambda: [assets.still_png[: rng.randrange(len(assets.still_png))]],
        lambda: [flipped(rng, assets.still_png, 32)],
        lambda: [png_header(rng.randrange(10_000, 60_000), rng.randrange(10_000, 60_000))],
        lambda: [random_bytes(rng, 65536)],
        lambda: [b"", b""],
        lambda: [],
        lambda: [assets.text],
        lambda: [assets.video[start : start + 997] for start in range(0, len(assets.video), 997)],
    ]
    return rng.choice(choices)()


def submit_messages(spec: jobs_pb2.JobSpec, upload: Sequence[bytes]) -> list[bytes]:
    first = jobs_pb2.SubmitJobRequest(spec=spec).SerializeToString()
    return [first, *(jobs_pb2.SubmitJobRequest(target_chunk=piece).SerializeToString() for piece in upload)]


def mutate_spec(rng: random.Random, spec: jobs_pb2.JobSpec, assets: Assets) -> FuzzCase:
    """One or two field mutations of a valid spec; some switch it to an upload of malformed media."""
    upload: list[bytes] = []
    fields = [rng.choice(SPEC_FIELDS) for _ in range(rng.choice([1, 1, 2]))]
    for field in fields:
        if field == "source":
            spec.source_image = bad_image(rng, assets)
        elif field == "uri":
            spec.target_uri = bad_uri(rng)
        elif field == "upload":
            spec.target_uri, spec.target_filename = "", rng.choice(["clip.mp4", "photo.png", "x.mkv", "noext"])
            upload = bad_upload(rng, assets)
        elif field == "filename":
            spec.target_uri, spec.target_filename = "", rng.choice([random_text(rng), "n" * 100_000, "../../x.mp4"])
            upload = [assets.video]
        elif field == "selector":
            selector = rng.choice([rng.randrange(-(2**31), 2**31), 4, -1, jobs_pb2.FACE_SELECTOR_MODE_REFERENCE])
            spec.selector = cast(jobs_pb2.FaceSelectorMode, selector)
        elif field == "reference":
            spec.selector = jobs_pb2.FACE_SELECTOR_MODE_REFERENCE
            spec.reference_image = bad_image(rng, assets)
        elif field == "crf":
            spec.encode.crf = rng.choice([rng.randrange(-(2**31), 2**31), -1, 52, 1000, rng.randrange(-60, 60)])
        else:
            spec.encode.preset = rng.choice([random_text(rng, 40), "bogus", "x" * 100_000, "veryslow\x00", "ULTRAFAST"])
    return FuzzCase("+".join(sorted(set(fields))), "SubmitJob", submit_messages(spec, upload))


def wire_garbage(rng: random.Random, valid: bytes) -> list[bytes]:
    """Bytes that are not the message they claim to be: random, cut short, flipped, or invalid UTF-8."""
    choices: list[Callable[[], list[bytes]]] = [
        lambda: [random_bytes(rng, 512)],
        lambda: [valid[: rng.randrange(1, len(valid))]],
        lambda: [flipped(rng, valid, 8)],
        # spec { target_uri: <invalid UTF-8> }
        lambda: [b"\x0a\x05\x12\x03\xff\xfe\xfd"],
        lambda: [valid, random_bytes(rng, 64)],
        # An unknown field after a valid spec: legal protobuf, so this one reaches validation.
        lambda: [valid + b"\xf8\x07\x2a"],
    ]
    return rng.choice(choices)()


def stream_shape(rng: random.Random, valid_spec: bytes, assets: Assets) -> list[bytes]:
    """A wrong sequence of valid messages: nothing, an upload without a spec, two specs, a uri and an upload."""
    chunk = jobs_pb2.SubmitJobRequest(target_chunk=assets.video[:1000]).SerializeToString()
    return rng.choice([[], [chunk], [chunk, valid_spec], [valid_spec, valid_spec], [valid_spec, chunk]])


def submit_cases(rng: random.Random, base: jobs_pb2.JobSpec, assets: Assets) -> Iterator[FuzzCase]:
    valid_spec = jobs_pb2.SubmitJobRequest(spec=base).SerializeToString()
    for _ in range(SUBMIT_CASES):
        roll = rng.random()
        if roll < 0.08:
            yield FuzzCase("wire", "SubmitJob", wire_garbage(rng, valid_spec))
        elif roll < 0.12:
            yield FuzzCase("stream", "SubmitJob", stream_shape(rng, valid_spec, assets))
        else:
            spec = jobs_pb2.JobSpec()
            spec.CopyFrom(base)
            yield mutate_spec(rng, spec, assets)


def bad_job_id(rng: random.Random, known: Sequence[str]) -> str:
    choices: list[Callable[[], str]] = [
        lambda: rng.choice(known),
        lambda: rng.randbytes(8).hex(),
        lambda: random_text(rng, 64),
        lambda: "j" * rng.randrange(1000, 1_000_000),
        lambda: rng.choice(known) + "\x00",
        lambda: "' OR 1=1 --",
        lambda: "../../etc/passwd",
        lambda: "",
    ]
    return rng.choice(choices)()


def other_request(rng: random.Random, method: str, known: Sequence[str]) -> bytes:
    if rng.random() < 0.1:
        return random_bytes(rng, 256)
    if method == "GetJob":
        return jobs_pb2.GetJobRequest(job_id=bad_job_id(rng, known)).SerializeToString()
    if method == "WatchJob":
        return jobs_pb2.WatchJobRequest(job_id=bad_job_id(rng, known)).SerializeToString()
    if method == "CancelJob":
        return jobs_pb2.CancelJobRequest(job_id=bad_job_id(rng, known)).SerializeToString()
    if method == "FetchArtifact":
        artifact = cast(jobs_pb2.Artifact, rng.choice([rng.randrange(-(2**31), 2**31), 0, 1, 2, 3, 4, 5]))
        return jobs_pb2.FetchArtifactRequest(job_id=bad_job_id(rng, known), artifact=artifact).SerializeToString()
    limit = rng.choice([rng.randrange(-(2**31), 2**31), 0, -1, 10**6])
    state = cast(jobs_pb2.JobState, rng.choice([rng.randrange(-(2**31), 2**31), 0, 5, 99]))
    return jobs_pb2.ListJobsRequest(limit=limit, state=state).SerializeToString()


def other_cases(rng: random.Random, known: Sequence[str]) -> Iterator[FuzzCase]:
    for _ in range(OTHER_CASES):
        method = rng.choice(["GetJob", "WatchJob", "CancelJob", "FetchArtifact", "ListJobs"])
        yield FuzzCase(method, method, [other_request(rng, method, known)])


# --- the run ---------------------------------------------------------------------------------------------------


def run_all(service: RawJobService, cases: Iterator[FuzzCase] | Sequence[FuzzCase]) -> list[Outcome]:
    """Every call, CONCURRENT_CALLS at a time; a job that was accepted is cancelled at once."""

    def one(case: FuzzCase) -> Outcome:
        outcome = service.call(case)
        if outcome.job_id:
            service.cancel(outcome.job_id)
        return outcome

    with ThreadPoolExecutor(CONCURRENT_CALLS) as pool:
        return list(pool.map(one, list(cases)))


def histogram(outcomes: Sequence[Outcome]) -> Counter[str]:
    return Counter(outcome.code for outcome in outcomes)


def report(title: str, outcomes: Sequence[Outcome]) -> str:
    """The status histogram, then per kind of request: how many, their mean latency, and their statuses."""
    lines = [f"{title}: {len(outcomes)} requests, statuses {dict(histogram(outcomes).most_common())}"]
    for kind in sorted({outcome.kind for outcome in outcomes}):
        mine = [outcome for outcome in outcomes if outcome.kind == kind]
        seconds = sum(outcome.seconds for outcome in mine) / len(mine)
        lines.append(f"  {kind:<22} {len(mine):>4}  {seconds * 1000:>6.0f} ms  {dict(histogram(mine).most_common())}")
    return "\n".join(lines)


def process_ids(stack: EmbeddedStack) -> dict[str, int]:
    return {name: stack.pid(name) for name in stack.restarts()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def assets(media: Path) -> Assets:
    left, top, right, bottom = sample_media.GRACE_HOPPER_PORTRAIT
    portrait = sample_media.grace_hopper_photo()[top:bottom, left:right]
    # A small face keeps the detector's share of the fuzz low; it is still found.
    face = cv2.resize(portrait, (portrait.shape[1] // 3, portrait.shape[0] // 3), interpolation=cv2.INTER_AREA)
    video = sample_media.make_face_video(
        media / "fuzz-target.mp4", sample_media.astronaut_photo(), seconds=0.4, size=(160, 120), fps=10, audio=False
    )
    still = sample_media.encode_png(sample_media.astronaut_photo()[::4, ::4].copy())
    text = sample_media.make_not_media_file(media / "fuzz-notes.txt").read_bytes()
    return Assets(face_png=sample_media.encode_png(face), video=video.read_bytes(), still_png=still, text=text)


def test_a_thousand_mutated_requests_get_clean_statuses_and_nothing_dies(
    stack: EmbeddedStack, assets: Assets, media: Path, hopper_png: bytes
) -> None:
    target = stack.options.media_root / in_tenant_area(stack_tenant(stack), FUZZ_TARGET)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(assets.video)
    base = jobs_pb2.JobSpec(
        source_image=assets.face_png,
        target_uri=FUZZ_TARGET,
        selector=jobs_pb2.FACE_SELECTOR_MODE_ONE,
        encode=encoder_pb2.EncodeSettings(crf=23, preset="veryfast"),
    )
    processes_before, restarts_before = process_ids(stack), stack.restarts()
    channel, metadata = stack_channel(stack)
    rng = random.Random(SEED)
    with channel:
        service = RawJobService(channel, metadata)
        unmutated = service.call(FuzzCase("unmutated", "SubmitJob", submit_messages(base, [])))
        assert unmutated.code == "OK", f"the unmutated spec must be valid: {unmutated.details}"
        service.cancel(unmutated.job_id)
        submitted = run_all(service, submit_cases(rng, base, assets))
        known = [job.id for job in service.stub.ListJobs(jobs_pb2.ListJobsRequest(limit=100), metadata=metadata).jobs]
        others = run_all(service, other_cases(rng, known))

    submit_codes, other_codes = histogram(submitted), histogram(others)
    print(f"\n{report('SubmitJob, mutated', submitted)}\n{report('Get/Watch/Cancel/Fetch/List', others)}")
    internal = [outcome.details for outcome in [*submitted, *others] if outcome.code == "INTERNAL"]
    assert internal == [], f"{len(internal)} client mistakes answered INTERNAL, e.g. {internal[:3]}"
    assert len(submitted) >= 1000
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"} <= set(submit_codes)
    assert len(submit_codes) >= 4 and len(other_codes) >= 3
    assert "DEADLINE_EXCEEDED" not in submit_codes | other_codes
    server_paths = (str(stack.options.work_dir), str(stack.options.media_root.resolve()))
    leaks = [o.details for o in [*submitted, *others] if any(path in o.details for path in server_paths)]
    assert leaks == [], f"messages show server paths: {leaks[:3]}"
    echoes = [o.details[:80] for o in [*submitted, *others] if len(o.details) > MAX_DETAILS_CHARACTERS]
    assert echoes == [], f"messages echo input whole: {echoes[:3]}"

    assert process_ids(stack) == processes_before and stack.restarts() == restarts_before
    assert all(alive(pid) for pid in processes_before.values())
    clip = sample_media.make_face_video(
        media / "fuzz-valid.mp4", sample_media.astronaut_photo(), seconds=1.0, size=(320, 240)
    )
    with stack.job_client() as client:
        job = client.submit(hopper_png, target_path=clip)
        finished = wait_for_end(client, job.id)
    assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED, finished.error.message
    assert finished.frames_done == finished.frames_total == 25


class PlantedBugJobService(jobs_pb2_grpc.JobServiceServicer):
    """GetJob has a bug of ours."""

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        await asyncio.sleep(0)
        raise RuntimeError(f"planted bug reading job {request.job_id[:8]}")


def test_a_planted_server_bug_still_comes_back_internal() -> None:
    """The fuzz's no-INTERNAL check can fail: a real bug behind the same server plumbing is INTERNAL."""
    settings = ServerSettings(port=0, transport_security="plaintext", auth_mode="open", metrics_port=-1)
    full_name = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
    binding = ServiceBinding(
        PlantedBugJobService(), jobs_pb2_grpc.add_JobServiceServicer_to_server, full_name, audience="public"
    )
    rng = random.Random(SEED)
    requests = [jobs_pb2.GetJobRequest(job_id=bad_job_id(rng, ["a"])).SerializeToString() for _ in range(20)]
    with serving(settings, [binding]) as channel:
        outcomes = run_all(RawJobService(channel, []), [FuzzCase("get", "GetJob", [request]) for request in requests])
    assert histogram(outcomes) == Counter({"INTERNAL": 20})
    assert all("RuntimeError: planted bug" in outcome.details for outcome in outcomes)

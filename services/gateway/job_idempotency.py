"""Idempotency keys of SubmitJob and SubmitBatch: the key's checks and the fingerprint of the request it was sent with.

A key is the tenant's: two tenants may use the same one. The job that an accepted submission creates
holds its key (a unique index per tenant and key in the store) for as long as the job is stored, so a
retry with the same key returns that job. The retry must send the same request: the fingerprint, a
SHA-256 over the spec's fields and the target (the URI it names, or the bytes it uploads, hashed as
they stream in), tells a retry from a different request reusing the key, which is refused.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from services.common.errors import AlreadyExists, InvalidArgument
from services.common.input_limits import excerpt
from services.gateway.job_records import BatchRecord, BatchRequest, JobRecord, JobRequest

MAX_IDEMPOTENCY_KEY_LENGTH = 128
# Bumped if what the fingerprint covers changes; a stored fingerprint of another version never matches.
_FINGERPRINT_VERSION = b"swapline-submit-v1"
_BATCH_FINGERPRINT_VERSION = b"swapline-batch-v1"


def checked_idempotency_key(key: str) -> str:
    """The key if it is usable: at most 128 printable ASCII characters (no spaces at either end)."""
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidArgument(
            f"idempotency_key is {len(key)} characters long; at most {MAX_IDEMPOTENCY_KEY_LENGTH} are allowed"
        )
    if any(not (" " <= character <= "~") for character in key) or key != key.strip():
        raise InvalidArgument(
            f"idempotency_key {excerpt(key)} must be printable ASCII without leading or trailing spaces (a UUID, say)"
        )
    return key


def _add_fields(digest: hashlib._Hash, fields: Iterable[bytes]) -> None:
    """Length-prefixed, so no two sequences of fields hash the same bytes."""
    for field in fields:
        digest.update(struct.pack(">Q", len(field)))
        digest.update(field)


class RequestFingerprint:
    """SHA-256 over the spec's fields and then the uploaded target's bytes, fed as they arrive; nothing of
    the upload is kept."""

    def __init__(self, request: JobRequest) -> None:
        self._hash = hashlib.sha256(_FINGERPRINT_VERSION)
        _add_fields(
            self._hash,
            (
                request.source_image,
                request.target_uri.encode(),
                request.target_filename.encode(),
                request.selector.encode(),
                request.reference_image,
                str(request.encode.crf).encode(),
                request.encode.preset.encode(),
                request.swapper.encode(),
                request.detector.encode(),
            ),
        )
        self._uploaded = hashlib.sha256()

    def add_upload(self, piece: bytes) -> None:
        self._uploaded.update(piece)

    def hexdigest(self) -> str:
        whole = self._hash.copy()
        whole.update(self._uploaded.digest())
        return whole.hexdigest()


def batch_fingerprint(request: BatchRequest) -> str:
    """SHA-256 over the batch spec but its skipped pairs: an upload counts by filename and size, not bytes, so
    a retry resuming a batch of large uploads need not send them again."""
    digest = hashlib.sha256(_BATCH_FINGERPRINT_VERSION)
    fields: list[bytes] = [str(len(request.targets)).encode()]
    for target in request.targets:
        fields += [target.uri.encode(), target.filename.encode(), str(target.size_bytes).encode()]
    fields.append(str(len(request.sources)).encode())
    for source in request.sources:
        fields += [source.name.encode(), source.image]
    fields.append(",".join(f"{pair.target_index}:{pair.source_index}" for pair in request.all_pairs()).encode())
    fields += [
        request.selector.encode(),
        request.reference_image,
        str(request.encode.crf).encode(),
        request.encode.preset.encode(),
        request.swapper.encode(),
        request.detector.encode(),
        request.name.encode(),
    ]
    _add_fields(digest, fields)
    return digest.hexdigest()


def replayed(job: JobRecord, key: str, fingerprint: str) -> JobRecord:
    """The job a key already holds, if the retry sent the request that created it; else ALREADY_EXISTS."""
    _check_same_request(f"job {job.id}", job.payload_fingerprint, key, fingerprint)
    return job


def replayed_batch(batch: BatchRecord, key: str, fingerprint: str) -> BatchRecord:
    """The batch a key already holds, if the retry sent the spec that created it; else ALREADY_EXISTS."""
    _check_same_request(f"batch {batch.id}", batch.payload_fingerprint, key, fingerprint)
    return batch


def _check_same_request(holder: str, held_fingerprint: str, key: str, fingerprint: str) -> None:
    if held_fingerprint != fingerprint:
        raise AlreadyExists(
            f"idempotency_key {key!r} was already used for {holder} with a different request "
            "(spec or target); send that request again to get it, or use a new key for a new submission"
        )

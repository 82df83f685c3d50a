"""ListJobs' page tokens: a cursor into the order jobs are listed in, tied to the filter it was made for.

Jobs list newest first: by created_at, descending, and among jobs created at the same instant by their id,
descending. Both are fixed when a job is stored, so the
cursor, the sort key of the last job a page held, names a place in that order even if that job is
deleted: the next page holds the jobs after it. A job present for the whole listing is never skipped nor
repeated; a job stored meanwhile appears only if it sorts after the cursor (one created later does not).

The token is opaque to clients: URL-safe base64 of a small versioned JSON payload. It carries a digest
of the filter (state and tenant), so a token used with another filter is refused rather than read as a
place in a different listing. It holds nothing but the last listed job's own creation time and id, so a
tenant learns nothing from it about other tenants' jobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.gateway.job_records import JobState

_TOKEN_VERSION = 1
# A token this gateway makes is well under this; longer ones are refused before decoding.
MAX_PAGE_TOKEN_LENGTH = 256


@dataclass(frozen=True)
class JobCursor:
    """The sort key of the last job of a page: jobs after it have (created_at, id) less than this."""

    created_at: float
    job_id: str


def filter_digest(state: JobState | None, tenant: str | None, batch_id: str = "") -> str:
    """What a token is tied to: the state and batch filters and whose jobs are listed (None: every tenant's)."""
    described = json.dumps([state or "", tenant if tenant is not None else None, batch_id])
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def page_token(cursor: JobCursor, state: JobState | None, tenant: str | None, batch_id: str = "") -> str:
    payload = {
        "v": _TOKEN_VERSION,
        "c": cursor.created_at,
        "i": cursor.job_id,
        "f": filter_digest(state, tenant, batch_id),
    }
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


_NOT_OURS = "page_token is not a token ListJobs gave; pass a response's next_page_token as it is"


def cursor_of(token: str, state: JobState | None, tenant: str | None, batch_id: str = "") -> JobCursor | None:
    """The cursor a token holds (None for the empty token: the first page); INVALID_ARGUMENT if the token
    is malformed or was made for another filter."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise InvalidArgument(f"page_token is {len(token)} characters long; {_NOT_OURS}")
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(payload, dict) or payload.get("v") != _TOKEN_VERSION:
            raise ValueError("unknown payload")
        created_at, job_id, digest = payload["c"], payload["i"], payload["f"]
        if not isinstance(created_at, (int, float)) or isinstance(created_at, bool) or not math.isfinite(created_at):
            raise ValueError("bad created_at")
        if not isinstance(job_id, str) or not isinstance(digest, str):
            raise ValueError("bad job id or filter")
    except (ValueError, KeyError, binascii.Error, UnicodeDecodeError) as error:
        raise InvalidArgument(_NOT_OURS) from error
    if digest != filter_digest(state, tenant, batch_id):
        raise InvalidArgument(
            "page_token was made for another filter than this request's (state "
            f"{state or 'any'}, batch {batch_id or 'any'}); use it with the filter it came with, or start again "
            "without a page_token"
        )
    return JobCursor(float(created_at), job_id)

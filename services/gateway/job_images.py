"""A job's source and reference images in media storage: written at submit, read when a chunk is leased.

They live in the job's work area, beside its segments, and go with it when the job succeeds; the job table
holds only their URIs, so reading a job never loads image bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.common.media_paths import existing_media_path, temporary_path, writable_media_path


def work_area(job_id: str) -> str:
    return f"work/{job_id}"


def source_image_uri(job_id: str) -> str:
    return f"{work_area(job_id)}/source-image"


def reference_image_uri(job_id: str) -> str:
    return f"{work_area(job_id)}/reference-image"


def write_media_file(media_root: Path, uri: str, data: bytes) -> None:
    """Written to a temporary name beside the file, then renamed: readers never see a partial file."""
    path = writable_media_path(media_root, uri)
    temporary = temporary_path(path)
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_media_file(media_root: Path, uri: str) -> bytes:
    """The file's bytes; an empty URI (no reference image) reads as no bytes."""
    if not uri:
        return b""
    return existing_media_path(media_root, uri).read_bytes()

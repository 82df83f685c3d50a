"""What a submission is checked against and stores before its jobs are queued, for SubmitJob and SubmitBatch
alike: the strings and encode settings, the tenant's storage, the images and their faces, the target named
or uploaded, and its probe.

Every check that reads bytes sizes them first (image headers, upload limits), and every blocking step runs
in a thread, so a submission never holds up the event loop nor allocates what a limit would refuse.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from services.common.encode_options import checked_crf, checked_preset
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.image_codec import decode_rgb_image
from services.common.input_limits import InputLimits, check_media, check_text, excerpt, image_size
from services.common.job_vocabulary import SelectorMode
from services.common.media_info import MediaInfo
from services.common.media_paths import check_media_uri, writable_media_path
from services.gateway.job_images import reference_image_uri, source_image_uri, write_media_file
from services.gateway.job_records import EncodeOptions, TenantStorage
from services.gateway.job_store import JobStore
from services.gateway.media_clients import MediaServices, downscaled
from services.gateway.tenant_areas import resolve_target

_UNSAFE_FILENAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
# An upload is written under this name in its folder, and renamed once it is whole.
PARTIAL_UPLOAD_NAME = ".upload-in-progress"

# Called with each uploaded piece as it is written (a fingerprint hashing it, say).
PieceObserver = Callable[[bytes], None]


def sanitised_filename(name: str) -> str:
    """The upload's base name, reduced to characters that are safe in any path; never empty or hidden."""
    base = _UNSAFE_FILENAME_CHARACTERS.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    return base or "target"


class JobIntake:
    def __init__(
        self,
        store: JobStore,
        media: MediaServices,
        media_root: Path,
        max_upload_bytes: int,
        limits: InputLimits,
        max_concurrent_image_checks: int,
    ) -> None:
        self._store = store
        self._media = media
        self._media_root = media_root
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits
        # Decoding images and counting their faces (on the detector and Triton) costs memory per request:
        # a burst of submissions takes turns here, so it peaks no higher than a few submissions do.
        self._image_checks = asyncio.Semaphore(max_concurrent_image_checks)

    def check_target_names(self, target_uri: str, target_filename: str) -> None:
        """Lengths and characters first: nothing else is looked at before they pass."""
        check_text("target_uri", target_uri, self.limits.max_uri_length)
        check_text("target_filename", target_filename, self.limits.max_filename_length)

    @staticmethod
    def check_encode(encode: EncodeOptions) -> None:
        # crf 0 and an empty preset ask for the encoder's defaults.
        checked_crf(encode.crf)
        if encode.preset:
            checked_preset(encode.preset)

    async def storage_with_room(self, tenant: str) -> TenantStorage:
        storage = await self._store.run(self._store.storage_of, tenant)
        if storage.is_full():
            raise ResourceExhausted(
                f"the media storage of tenant {tenant} is full ({storage.used_bytes} of {storage.max_bytes} "
                "bytes): no new jobs until retention removes ended ones or the limit is raised"
            )
        return storage

    async def decoded_image(self, data: bytes, what: str) -> np.ndarray:
        """The image, sized from its header before OpenCV allocates anything, scaled to the detector's size."""
        image_size(data, what, self.limits)
        async with self._image_checks:
            return await asyncio.to_thread(_decoded_for_detection, data, what, self.limits.max_image_pixels)

    async def decoded_reference(self, selector: SelectorMode, reference_image: bytes) -> np.ndarray | None:
        """The reference image decoded when the selector uses one (it must then be there); else None."""
        if selector != "reference":
            return None
        if not reference_image:
            raise InvalidArgument("selector REFERENCE needs a reference_image holding the face to replace")
        return await self.decoded_image(reference_image, "reference image")

    async def require_face(self, image: np.ndarray, what: str) -> None:
        async with self._image_checks:
            if await self._media.count_faces(image) == 0:
                raise FailedPrecondition(f"no face found in the {what}")

    async def named_target(self, tenant: str, target_uri: str) -> str:
        """The media-root-relative URI of the file the tenant's target_uri names."""
        check_media_uri(target_uri, self.limits)
        return await asyncio.to_thread(resolve_target, self._media_root, tenant, target_uri)

    async def receive_upload(
        self,
        tenant: str,
        uri: str,
        upload: AsyncIterator[bytes],
        storage: TenantStorage,
        observe: PieceObserver | None = None,
        max_bytes: int = 0,
    ) -> int:
        """Streams the upload to `uri` as it arrives, so a large target never sits in memory; the file gets
        its name only once it is whole. Its size. max_bytes: a smaller limit than the gateway's (0: none)."""
        limit = min(max_bytes, self.max_upload_bytes) if max_bytes else self.max_upload_bytes
        path = await asyncio.to_thread(writable_media_path, self._media_root, uri)
        partial = path.with_name(PARTIAL_UPLOAD_NAME)
        received = 0
        file = await asyncio.to_thread(partial.open, "wb")
        try:
            async for piece in upload:
                received += len(piece)
                if received > limit:
                    raise InvalidArgument(f"uploaded target exceeds the limit of {limit} bytes")
                if storage.is_full(received):
                    raise ResourceExhausted(
                        f"the upload fills the media storage of tenant {tenant} ({storage.used_bytes} of "
                        f"{storage.max_bytes} bytes used before it)"
                    )
                await asyncio.to_thread(_write_and_observe, file, piece, observe)
        finally:
            await asyncio.to_thread(file.close)
        if received == 0:
            raise InvalidArgument("uploaded target is empty")
        await asyncio.to_thread(os.replace, partial, path)
        return received

    async def probed_target(self, uri: str, named: str) -> MediaInfo:
        """The target's probe, checked against the limits; `named` is how the client named it."""
        target = await self._media.probe(uri)
        check_media(target, "target", self.limits)
        if target.width <= 0 or target.height <= 0:
            raise InvalidArgument(f"target {excerpt(named)} has no picture size ({target.width}x{target.height})")
        if target.kind == "video" and target.frame_count <= 0:
            raise InvalidArgument(f"target {excerpt(named)} has no video frames")
        return target

    async def store_images(self, job_id: str, source_image: bytes, reference_image: bytes) -> tuple[str, str]:
        """The job's images go to media storage, written whole before the job that names them is stored; their
        URIs (the reference's empty when there is none)."""
        source_uri = source_image_uri(job_id)
        reference_uri = reference_image_uri(job_id) if reference_image else ""
        await asyncio.to_thread(write_media_file, self._media_root, source_uri, source_image)
        if reference_uri:
            await asyncio.to_thread(write_media_file, self._media_root, reference_uri, reference_image)
        return source_uri, reference_uri


def _write_and_observe(file: BinaryIO, piece: bytes, observe: PieceObserver | None) -> None:
    file.write(piece)
    if observe is not None:
        observe(piece)


def _decoded_for_detection(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    """Decoded and scaled down to the detector's size, in one worker-thread step."""
    return np.ascontiguousarray(downscaled(decode_rgb_image(data, what, max_pixels)))

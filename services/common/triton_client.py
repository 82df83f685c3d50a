"""The one Triton client of a process: long-lived, a timeout on every call, numpy in and out.

With `shared_memory` the tensors travel through /dev/shm regions registered with Triton instead of
the gRPC payload (triton_shared_memory); a Triton that cannot map them (another host) turns it off
for the rest of the process with one warning, and the request goes through gRPC as usual.

A Triton that is down or restarting fails requests at once as Unavailable (retryable): callers wait
for readiness (is_model_ready) rather than holding requests open. A restarted Triton has forgotten
the shared-memory regions registered with its predecessor; the first request that meets that drops
them and is sent again in a fresh region.

Every model served here batches (max_batch_size > 0), so every output's first dimension is the
request's batch; an answer that lacks an output or has another batch fails as FailedPrecondition
naming the model, instead of surfacing later as "no face found" or a reshape error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import tritonclient.grpc as triton_types
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.common.face_detector_models import UNBATCHED_MODELS
from services.common.grpc_channel import RECONNECT_BACKOFF_MS, balancing_options
from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES
from services.common.triton_shared_memory import (
    Placement,
    PoolLimits,
    SharedMemoryPool,
    SharedMemoryRegion,
    SharedMemoryUnavailable,
    is_transient,
    plan_layout,
)

log = logging.getLogger(__name__)

# A readiness probe answers at once from a live server; a longer wait means it is not serving.
READY_TIMEOUT_SECONDS = 5.0
# The channel retries a lost connection at most this far apart, so a restarted Triton is found within
# about this long instead of gRPC's default of up to two minutes.
# How Triton names a shared-memory region it does not know: one registered with a predecessor.
_UNKNOWN_REGION = "unable to find"


def _error_for(model: str, error: InferenceServerException) -> Exception:
    status = (error.status() or "").upper()
    text = f"triton model {model}: {error.message()}"
    if is_transient(error) or "connect" in text.lower():
        return Unavailable(text)
    if "RESOURCE_EXHAUSTED" in status or "out of memory" in text.lower():
        return ResourceExhausted(text)
    if "NOT_FOUND" in status or "unknown model" in text.lower() or "not ready" in text.lower():
        return FailedPrecondition(text)
    return InvalidArgument(text)


class _UnknownRegion(Exception):
    """Triton no longer knows a region of the pool: it restarted since the region was registered."""


def _batch_size(arrays: Mapping[str, np.ndarray]) -> int | None:
    """The first dimension every input shares, or None where they do not (no batch to check against)."""
    sizes = {array.shape[0] for array in arrays.values() if array.ndim}
    return sizes.pop() if len(sizes) == 1 else None


def check_outputs(
    model: str, answered: Mapping[str, np.ndarray | None], outputs: Sequence[str], batch: int | None
) -> dict[str, np.ndarray]:
    """Every requested output, present and holding `batch` items; otherwise FailedPrecondition naming the model."""
    checked = {}
    for name in outputs:
        array = answered.get(name)
        if array is None:
            raise FailedPrecondition(f"model {model} returned no {name!r} output")
        if batch is not None and (array.ndim == 0 or array.shape[0] != batch):
            raise FailedPrecondition(f"model {model} returned {name!r} of shape {array.shape} for a batch of {batch}")
        checked[name] = array
    return checked


def _inputs(arrays: Mapping[str, np.ndarray]) -> list[triton_types.InferInput]:
    return [
        triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        for name, array in arrays.items()
    ]


class TritonClient:
    def __init__(
        self,
        url: str,
        timeout_seconds: float,
        shared_memory: bool = False,
        pool_limits: PoolLimits | None = None,
    ) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        channel_args = [
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
            # With a headless Service name (dns:///...) calls spread over every Triton pod, and pods added
            # later are found when Triton's --grpc-max-connection-age (the chart's) closes a connection.
            *balancing_options(),
        ]
        self._client = triton_grpc.InferenceServerClient(url, channel_args=channel_args)
        self._shared_memory = SharedMemoryPool(self._client, timeout_seconds, pool_limits) if shared_memory else None
        self._retired_pools: list[SharedMemoryPool] = []

    @property
    def uses_shared_memory(self) -> bool:
        return self._shared_memory is not None

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        # SCRFD's and RetinaFace's outputs have no batch axis to check against the inputs'.
        batch = None if model in UNBATCHED_MODELS else _batch_size(arrays)
        if self._shared_memory is not None:
            try:
                answered = await self._infer_in_a_region(self._shared_memory, model, arrays, outputs)
                return check_outputs(model, answered, outputs, batch)
            except SharedMemoryUnavailable as error:
                self._stop_shared_memory(error)
        request_inputs = _inputs(arrays)
        for tensor, array in zip(request_inputs, arrays.values(), strict=True):
            tensor.set_data_from_numpy(array)
        request_outputs = [triton_grpc.InferRequestedOutput(name) for name in outputs]
        result = await self._call(model, request_inputs, request_outputs)
        return check_outputs(model, {name: result.as_numpy(name) for name in outputs}, outputs, batch)

    async def _call(
        self,
        model: str,
        inputs: list[triton_types.InferInput],
        outputs: list[triton_types.InferRequestedOutput],
        region: SharedMemoryRegion | None = None,
    ) -> triton_types.InferResult:
        try:
            return await self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            if region is not None and _UNKNOWN_REGION in error.message().lower() and region.name in error.message():
                raise _UnknownRegion(error.message()) from error
            raise _error_for(model, error) from error

    async def _infer_in_a_region(
        self, pool: SharedMemoryPool, model: str, arrays: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray | None]:
        """One request through shared memory; sent once more if Triton restarted since the region was registered."""
        try:
            return await self._infer_through_shared_memory(pool, model, arrays, outputs)
        except _UnknownRegion as error:
            log.warning("Triton at %s restarted (%s); registering shared memory again", self.url, error)
            pool.forget_registrations()
        try:
            return await self._infer_through_shared_memory(pool, model, arrays, outputs)
        except _UnknownRegion as error:
            raise Unavailable(f"triton model {model}: {error}") from error

    async def _infer_through_shared_memory(
        self, pool: SharedMemoryPool, model: str, arrays: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray | None]:
        # No model served here answers with an output larger than its largest input; a larger one
        # fails the request with Triton's message naming the output.
        capacity = max(array.nbytes for array in arrays.values())
        layout = plan_layout({name: array.nbytes for name, array in arrays.items()}, outputs, capacity)
        region = await pool.acquire(layout.byte_size)
        answered = False
        try:
            request_inputs = _inputs(arrays)
            for tensor, placement in zip(request_inputs, layout.inputs, strict=True):
                region.write(arrays[placement.name], placement.offset)
                tensor.set_shared_memory(region.name, placement.byte_size, placement.offset)
            request_outputs = []
            for placement in layout.outputs:
                output = triton_grpc.InferRequestedOutput(placement.name)
                output.set_shared_memory(region.name, placement.byte_size, placement.offset)
                request_outputs.append(output)
            result = await self._call(model, request_inputs, request_outputs, region)
            outputs_read = _read_outputs(region, result, layout.outputs)
            answered = True
            return outputs_read
        finally:
            if answered:
                pool.release(region)
            else:
                pool.abandon(region)

    def _stop_shared_memory(self, error: SharedMemoryUnavailable) -> None:
        """New requests go over gRPC; requests already in a region finish there, and close() removes them."""
        if self._shared_memory is not None:
            log.warning("Triton at %s cannot use shared memory (%s); sending tensors over gRPC", self.url, error)
            self._retired_pools.append(self._shared_memory)
            self._shared_memory = None

    async def output_names(self, model: str) -> tuple[str, ...]:
        """The model's outputs in its config's order, which `swapline models import` writes in the graph's:
        the imported models whose outputs carry their exporters' names are read by position."""
        try:
            answer = await self._client.get_model_config(model, as_json=True, client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            raise _error_for(model, error) from error
        return tuple(output["name"] for output in answer["config"].get("output", []))

    async def is_model_ready(self, model: str) -> bool:
        try:
            timeout = min(self.timeout_seconds, READY_TIMEOUT_SECONDS)
            return bool(await self._client.is_model_ready(model, client_timeout=timeout))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        for pool in [*self._retired_pools, *([self._shared_memory] if self._shared_memory else [])]:
            await pool.close()
        await self._client.close()


def _read_outputs(
    region: SharedMemoryRegion, result: triton_types.InferResult, placements: Sequence[Placement]
) -> dict[str, np.ndarray | None]:
    """Each placed output as Triton described it, None for one it did not answer (check_outputs names it)."""
    answered = {output.name: output for output in result.get_response().outputs}
    read: dict[str, np.ndarray | None] = {}
    for placement in placements:
        output = answered.get(placement.name)
        if output is None:
            read[placement.name] = None
            continue
        dtype = np.dtype(triton_to_np_dtype(output.datatype))
        shape = [int(size) for size in output.shape]
        if int(np.prod(shape)) * dtype.itemsize > placement.byte_size:
            raise FailedPrecondition(
                f"model {result.get_response().model_name} returned {placement.name!r} of shape {shape}, "
                f"larger than the {placement.byte_size} bytes placed for it"
            )
        read[placement.name] = region.read(dtype, shape, placement.offset)
    return read

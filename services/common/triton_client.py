"""The one Triton client of a process: long-lived, a timeout on every call, numpy in and out.

With `shared_memory` the tensors travel through /dev/shm regions registered with Triton instead of
the gRPC payload (triton_shared_memory); a Triton that cannot map them (another host) turns it off
for the rest of the process with one warning, and the request goes through gRPC as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import tritonclient.grpc as triton_types
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES
from services.common.triton_shared_memory import (
    Placement,
    SharedMemoryPool,
    SharedMemoryRegion,
    SharedMemoryUnavailable,
    plan_layout,
)

log = logging.getLogger(__name__)


def _error_for(model: str, error: InferenceServerException) -> Exception:
    status = (error.status() or "").upper()
    text = f"triton model {model}: {error.message()}"
    if "UNAVAILABLE" in status or "DEADLINE" in status or "connect" in text.lower():
        return Unavailable(text)
    if "RESOURCE_EXHAUSTED" in status or "out of memory" in text.lower():
        return ResourceExhausted(text)
    if "NOT_FOUND" in status or "unknown model" in text.lower() or "not ready" in text.lower():
        return FailedPrecondition(text)
    return InvalidArgument(text)


def _inputs(arrays: Mapping[str, np.ndarray]) -> list[triton_types.InferInput]:
    return [
        triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        for name, array in arrays.items()
    ]


class TritonClient:
    def __init__(self, url: str, timeout_seconds: float, shared_memory: bool = False) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        channel_args = [
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            # With a headless Service name (dns:///...) calls spread over every Triton pod.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self._client = triton_grpc.InferenceServerClient(url, channel_args=channel_args)
        self._shared_memory = SharedMemoryPool(self._client, timeout_seconds) if shared_memory else None
        self._retired_pools: list[SharedMemoryPool] = []

    @property
    def uses_shared_memory(self) -> bool:
        return self._shared_memory is not None

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        if self._shared_memory is not None:
            try:
                return await self._infer_through_shared_memory(self._shared_memory, model, arrays, outputs)
            except SharedMemoryUnavailable as error:
                self._stop_shared_memory(error)
        request_inputs = _inputs(arrays)
        for tensor, array in zip(request_inputs, arrays.values(), strict=True):
            tensor.set_data_from_numpy(array)
        request_outputs = [triton_grpc.InferRequestedOutput(name) for name in outputs]
        result = await self._call(model, request_inputs, request_outputs)
        return {name: result.as_numpy(name) for name in outputs}

    async def _call(
        self,
        model: str,
        inputs: list[triton_types.InferInput],
        outputs: list[triton_types.InferRequestedOutput],
    ) -> triton_types.InferResult:
        try:
            return await self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            raise _error_for(model, error) from error

    async def _infer_through_shared_memory(
        self, pool: SharedMemoryPool, model: str, arrays: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
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
            result = await self._call(model, request_inputs, request_outputs)
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

    async def is_model_ready(self, model: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model, client_timeout=self.timeout_seconds))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        for pool in [*self._retired_pools, *([self._shared_memory] if self._shared_memory else [])]:
            await pool.close()
        await self._client.close()


def _read_outputs(
    region: SharedMemoryRegion, result: triton_types.InferResult, placements: Sequence[Placement]
) -> dict[str, np.ndarray]:
    answered = {output.name: output for output in result.get_response().outputs}
    return {
        placement.name: region.read(
            triton_to_np_dtype(answered[placement.name].datatype), answered[placement.name].shape, placement.offset
        )
        for placement in placements
    }

"""The one Triton client of a process: long-lived, a timeout on every call, numpy in and out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES


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


class TritonClient:
    def __init__(self, url: str, timeout_seconds: float) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        channel_args = [
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            # With a headless Service name (dns:///...) calls spread over every Triton pod.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self._client = triton_grpc.InferenceServerClient(url, channel_args=channel_args)

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        request_inputs = []
        for name, array in inputs.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            request_inputs.append(tensor)
        request_outputs = [triton_grpc.InferRequestedOutput(name) for name in outputs]
        try:
            result = await self._client.infer(
                model, request_inputs, outputs=request_outputs, client_timeout=self.timeout_seconds
            )
        except InferenceServerException as error:
            raise _error_for(model, error) from error
        return {name: result.as_numpy(name) for name in outputs}

    async def is_model_ready(self, model: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model, client_timeout=self.timeout_seconds))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()

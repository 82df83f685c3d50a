from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.errors import FailedPrecondition, InvalidArgument, SwaplineError, Unavailable
from services.common.triton_client import TritonClient

IMAGES = np.zeros((3, 3, 24, 24), np.float32)


def _response(outputs: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="mtcnn_rnet", model_version="1")
    for name, array in outputs.items():
        output = response.outputs.add(name=name, datatype="FP32")
        output.shape.extend(array.shape)
        response.raw_output_contents.append(array.astype(np.float32).tobytes())
    return response


class _CannedTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers every ModelInfer with one canned response, or fails it with one status."""

    def __init__(
        self, response: service_pb2.ModelInferResponse | None = None, status: tuple[grpc.StatusCode, str] | None = None
    ) -> None:
        self._response = response
        self._status = status

    async def ModelInfer(self, request: service_pb2.ModelInferRequest, context: Any) -> service_pb2.ModelInferResponse:
        if self._status is not None:
            await context.abort(*self._status)
        assert self._response is not None
        return self._response


def _infer(triton: _CannedTriton) -> dict[str, np.ndarray]:
    async def scenario() -> dict[str, np.ndarray]:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = TritonClient(f"127.0.0.1:{port}", 10.0)
        try:
            return await client.infer("mtcnn_rnet", {"image": IMAGES}, ["probability", "regression"])
        finally:
            await client.close()
            await server.stop(None)

    return asyncio.run(scenario())


def test_a_well_formed_answer_is_returned() -> None:
    answer = _infer(_CannedTriton(_response({"probability": np.ones((3, 2)), "regression": np.ones((3, 4))})))
    assert answer["probability"].shape == (3, 2) and answer["regression"].shape == (3, 4)


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        (
            {"probability": np.ones((0, 2)), "regression": np.ones((0, 4))},
            r"'probability' of shape \(0, 2\) for a batch of 3",
        ),
        ({"probability": np.ones((3, 2))}, "no 'regression' output"),
        ({"probability": np.ones((3, 2)), "regression": np.ones(())}, r"'regression' of shape \(\) for a batch of 3"),
    ],
    ids=["empty", "missing", "scalar"],
)
def test_an_answer_without_an_output_or_of_another_batch_fails_naming_the_model(
    outputs: dict[str, np.ndarray], problem: str
) -> None:
    with pytest.raises(FailedPrecondition, match=f"model mtcnn_rnet returned {problem}"):
        _infer(_CannedTriton(_response(outputs)))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            (grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'mtcnn_rnet' version 1 is not at ready state"),
            Unavailable,
        ),
        (
            (grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'mtcnn_rnet' has no available versions"),
            Unavailable,
        ),
        ((grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'mtcnn_rnet' is not found"), FailedPrecondition),
        ((grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'image'"), InvalidArgument),
    ],
    ids=["loading", "unloading", "unknown", "bad-input"],
)
def test_triton_refusals_are_retryable_only_while_the_model_may_come_back(
    status: tuple[grpc.StatusCode, str], expected: type[SwaplineError]
) -> None:
    with pytest.raises(SwaplineError) as caught:
        _infer(_CannedTriton(status=status))
    assert type(caught.value) is expected

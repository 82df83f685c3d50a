"""Triton's model repository API (explicit model-control mode) over tritonclient's aio gRPC client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    SwaplineError,
    Unavailable,
)
from services.common.grpc_channel import RECONNECT_BACKOFF_MS
from services.residency.model_residency import READY_STATE

# Triton may answer an unload before the model's instances are gone; its index says when they are.
UNLOAD_POLL_SECONDS = 0.05
SERVER_POLL_SECONDS = 0.5
_STILL_HOLDING = frozenset({READY_STATE, "UNLOADING"})


def _error_for(action: str, error: InferenceServerException) -> SwaplineError:
    status = (error.status() or "").upper()
    text = f"triton {action}: {error.message()}"
    if "UNAVAILABLE" in status or "connect" in text.lower():
        return Unavailable(text)
    if "RESOURCE_EXHAUSTED" in status or "out of memory" in text.lower():
        return ResourceExhausted(text)
    if "DEADLINE_EXCEEDED" in status:
        return DeadlineExceeded(text)
    return FailedPrecondition(text)


class TritonModelRepository:
    """One Triton server's repository API, every call bounded by `timeout_seconds`."""

    def __init__(self, url: str, timeout_seconds: float) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self._client = triton_grpc.InferenceServerClient(
            url, channel_args=[("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1])]
        )

    async def wait_until_serving(self, timeout_seconds: float) -> None:
        """Returns once the server answers as live; Unavailable after `timeout_seconds`."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                if await self._client.is_server_live(client_timeout=SERVER_POLL_SECONDS):
                    return
            except InferenceServerException as error:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"triton at {self.url} did not answer in {timeout_seconds:.0f} s: {error}"
                    ) from None
            if time.monotonic() > deadline:
                raise Unavailable(f"triton at {self.url} is not live after {timeout_seconds:.0f} s")
            await asyncio.sleep(SERVER_POLL_SECONDS)

    async def states(self) -> Mapping[str, str]:
        try:
            index = await self._client.get_model_repository_index(as_json=True, client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            raise _error_for("repository index", error) from error
        states: dict[str, str] = {}
        # One entry per version: a model serves when any of its versions does.
        for entry in index.get("models", []):
            name, state = str(entry["name"]), str(entry.get("state", ""))
            if states.get(name) != READY_STATE:
                states[name] = state
        return states

    async def load(self, name: str) -> None:
        try:
            await self._client.load_model(name, client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            raise _error_for(f"load of {name}", error) from error

    async def unload(self, name: str) -> None:
        try:
            await self._client.unload_model(name, client_timeout=self.timeout_seconds)
        except InferenceServerException as error:
            raise _error_for(f"unload of {name}", error) from error
        deadline = time.monotonic() + self.timeout_seconds
        while (await self.states()).get(name) in _STILL_HOLDING:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"triton model {name} still unloading after {self.timeout_seconds:.0f} s")
            await asyncio.sleep(UNLOAD_POLL_SECONDS)

    async def close(self) -> None:
        await self._client.close()

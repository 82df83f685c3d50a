from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from services.common.errors import NotFound, ResourceExhausted
from services.common.grpc_server import start_server
from services.common.residency_client import LoadOutcome, ResidencyClient
from services.common.settings_loader import SettingsError, load_settings
from services.residency.model_residency import ModelResidency
from services.residency.servicer import residency_binding
from services.residency.settings import BUILT_IN_MODELS, ENV_PREFIX, ResidencySettings
from swapline.residency.v1 import residency_pb2, residency_pb2_grpc
from tests.residency.fakes import FakeRepository, ManualClock, SimulatedMemory, write_model_files

ResultT = TypeVar("ResultT")
BUDGET = 250


def serve_residency(tmp_path: Path, call: Callable[[grpc.aio.Channel], Awaitable[ResultT]]) -> ResultT:
    """The service over real gRPC on a free loopback port, over models a, b, c of 100 bytes and a 250 byte budget."""
    repository = FakeRepository({"a": 100, "b": 100, "c": 100})
    for name in repository.sizes:
        write_model_files(tmp_path, name, 100)
    residency = ModelResidency(repository, tmp_path, SimulatedMemory(repository), BUDGET, {"a"}, 0.0, ManualClock())

    async def run() -> ResultT:
        settings = ResidencySettings(port=0, transport_security="plaintext", auth_mode="open")
        await residency.start()
        running = await start_server(settings, [residency_binding(residency)])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                return await call(channel)
        finally:
            await running.server.stop(None)

    return asyncio.run(run())


def test_ensure_loaded_answers_what_it_loaded_and_unloaded(tmp_path: Path) -> None:
    async def call(channel: grpc.aio.Channel) -> list[LoadOutcome]:
        client = ResidencyClient(channel)
        return [await client.ensure_loaded(["b"]), await client.ensure_loaded(["c", "a"])]

    assert serve_residency(tmp_path, call) == [LoadOutcome(("b",), ()), LoadOutcome(("c",), ("b",))]


def test_a_job_over_the_budget_fails_as_resource_exhausted_saying_why(tmp_path: Path) -> None:
    async def call(channel: grpc.aio.Channel) -> LoadOutcome:
        return await ResidencyClient(channel).ensure_loaded(["b", "c"])

    with pytest.raises(ResourceExhausted) as refused:
        serve_residency(tmp_path, call)
    assert refused.value.message == (
        "the job's models b (110 bytes, estimated), c (110 bytes, estimated) need 220 bytes of GPU memory "
        "together; this Triton server's budget is 250 bytes, of which its pinned models hold 100"
    )


def test_an_unknown_model_fails_as_not_found(tmp_path: Path) -> None:
    async def call(channel: grpc.aio.Channel) -> LoadOutcome:
        return await ResidencyClient(channel).ensure_loaded(["inswapper_128"])

    with pytest.raises(NotFound, match="inswapper_128"):
        serve_residency(tmp_path, call)


def test_list_resident_shows_the_most_recently_used_first(tmp_path: Path) -> None:
    async def call(channel: grpc.aio.Channel) -> residency_pb2.ListResidentResponse:
        await ResidencyClient(channel).ensure_loaded(["b"])
        stub = residency_pb2_grpc.ModelResidencyServiceStub(channel)
        return await stub.ListResident(residency_pb2.ListResidentRequest())

    answer = serve_residency(tmp_path, call)
    shown = [(model.name, model.bytes, model.measured, model.pinned) for model in answer.models]
    assert (shown, answer.budget_bytes, answer.resident_bytes) == (
        [("b", 100, True, False), ("a", 100, True, True)],
        250,
        200,
    )


def test_settings_pin_the_built_in_set_by_default() -> None:
    assert load_settings(ResidencySettings, ENV_PREFIX, {}).pinned_models == BUILT_IN_MODELS


def test_settings_read_the_budget_and_pinned_models() -> None:
    environ = {
        f"{ENV_PREFIX}MEMORY_BUDGET_BYTES": "8000000000",
        f"{ENV_PREFIX}PINNED_MODELS": "face_swapper,yoloface_8n",
    }
    settings = load_settings(ResidencySettings, ENV_PREFIX, environ)
    assert (settings.memory_budget_bytes, settings.pinned_models) == (8_000_000_000, ("face_swapper", "yoloface_8n"))


def test_settings_refuse_a_negative_budget() -> None:
    with pytest.raises(SettingsError, match=f"{ENV_PREFIX}MEMORY_BUDGET_BYTES=-1 must be at least 0"):
        load_settings(ResidencySettings, ENV_PREFIX, {f"{ENV_PREFIX}MEMORY_BUDGET_BYTES": "-1"})

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from services.common import triton_shared_memory
from services.common.errors import InvalidArgument, Unavailable
from services.common.triton_client import TritonClient
from services.common.triton_shared_memory import PoolLimits
from services.triton.local_models import LocalModels
from services.triton.server_process import EmbeddedTriton, locate_pytriton

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"

TIMEOUT_SECONDS = 30.0


# Tensors in the gRPC payload, and through shared memory regions registered with the server.
TRANSPORTS = pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc-payload", "shared-memory"])


async def _infer_all(
    url: str, model: str, requests: list[dict[str, np.ndarray]], outputs: list[str], shared_memory: bool = False
) -> list[dict[str, np.ndarray]]:
    client = TritonClient(url, TIMEOUT_SECONDS, shared_memory)
    try:
        answers = await asyncio.gather(*(client.infer(model, inputs, outputs) for inputs in requests))
        # Falling back to the payload would hide a broken shared-memory path.
        assert client.uses_shared_memory is shared_memory
        return answers
    finally:
        await client.close()


def _own_regions() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"swapline-{os.getpid()}-")]


def _execution_and_inference_counts(triton: EmbeddedTriton, model: str) -> tuple[int, int]:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        statistics = client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()
    return statistics.execution_count, statistics.inference_count


def test_pytriton_pieces_are_found() -> None:
    distribution = locate_pytriton()
    assert distribution.server_binary.name == "tritonserver"
    assert (distribution.python_backend / "libtriton_python.so").is_file()
    assert distribution.python_stub.is_file()
    assert any(distribution.library_dir.iterdir())


def test_every_configured_model_is_served(embedded_triton: EmbeddedTriton) -> None:
    # On this CPU machine: every ONNX model; the TorchScript cascade is served only on a GPU.
    assert embedded_triton.device == "cpu"
    assert embedded_triton.models == ["face_swapper", "face_swapper_fp32", "mtcnn_onet", "mtcnn_pnet", "mtcnn_rnet"]

    async def readiness() -> list[bool]:
        client = TritonClient(embedded_triton.grpc_url, TIMEOUT_SECONDS)
        try:
            return [await client.is_model_ready(model) for model in embedded_triton.models]
        finally:
            await client.close()

    assert all(asyncio.run(readiness()))


def test_the_server_and_its_stubs_are_told_how_to_wait_for_the_gpu(embedded_triton: EmbeddedTriton) -> None:
    assert embedded_triton.pid is not None
    environment = Path(f"/proc/{embedded_triton.pid}/environ").read_bytes().split(b"\0")
    assert b"SWAPLINE_TRITON_CUDA_WAIT=block" in environment


@TRANSPORTS
def test_rnet_through_triton_matches_in_process(
    embedded_triton: EmbeddedTriton, local_models: LocalModels, shared_memory: bool
) -> None:
    image = np.random.default_rng(11).uniform(0, 255, (7, 3, 24, 24)).astype(np.float32)
    outputs = ["probability", "regression"]

    (served,) = asyncio.run(
        _infer_all(embedded_triton.grpc_url, "mtcnn_rnet", [{"image": image}], outputs, shared_memory)
    )
    local = asyncio.run(local_models.infer("mtcnn_rnet", {"image": image}, outputs))

    for name in outputs:
        assert served[name].dtype == np.float32
        assert served[name].shape == local[name].shape
        np.testing.assert_allclose(served[name], local[name], atol=1e-5)


@TRANSPORTS
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    embedded_triton: EmbeddedTriton, local_models: LocalModels, shared_memory: bool
) -> None:
    rng = np.random.default_rng(12)
    requests = [{"image": rng.uniform(0, 255, (1 + index % 3, 3, 48, 48)).astype(np.float32)} for index in range(24)]
    outputs = ["probability", "regression", "landmarks"]
    executions_before, inferences_before = _execution_and_inference_counts(embedded_triton, "mtcnn_onet")

    answers = asyncio.run(_infer_all(embedded_triton.grpc_url, "mtcnn_onet", requests, outputs, shared_memory))

    for inputs, answer in zip(requests, answers, strict=True):
        expected = asyncio.run(local_models.infer("mtcnn_onet", inputs, outputs))
        for name in outputs:
            np.testing.assert_allclose(answer[name], expected[name], atol=1e-5)
    executions_after, inferences_after = _execution_and_inference_counts(embedded_triton, "mtcnn_onet")
    total_images = sum(inputs["image"].shape[0] for inputs in requests)
    assert inferences_after - inferences_before == total_images
    # Fewer model executions than requests: the dynamic batcher joined concurrent requests.
    assert executions_after - executions_before < len(requests)


@TRANSPORTS
def test_pnet_requests_of_different_sizes_are_answered_at_their_own_size(
    embedded_triton: EmbeddedTriton, local_models: LocalModels, shared_memory: bool
) -> None:
    rng = np.random.default_rng(13)
    sizes = [(30, 50), (64, 48), (30, 50), (100, 80)]
    requests = [{"image": rng.uniform(0, 255, (2, 3, height, width)).astype(np.float32)} for height, width in sizes]
    outputs = ["probability", "regression"]

    answers = asyncio.run(_infer_all(embedded_triton.grpc_url, "mtcnn_pnet", requests, outputs, shared_memory))

    for inputs, answer in zip(requests, answers, strict=True):
        expected = asyncio.run(local_models.infer("mtcnn_pnet", inputs, outputs))
        assert answer["probability"].shape == expected["probability"].shape
        np.testing.assert_allclose(answer["probability"], expected["probability"], atol=1e-5)
        np.testing.assert_allclose(answer["regression"], expected["regression"], atol=1e-5)


@TRANSPORTS
def test_face_swapper_round_trips_fp16(
    embedded_triton: EmbeddedTriton, local_models: LocalModels, shared_memory: bool
) -> None:
    rng = np.random.default_rng(14)
    inputs = {
        "target": rng.uniform(0, 1, (2, 3, 256, 256)).astype(np.float16),
        "source": rng.uniform(0, 1, (2, 3, 256, 256)).astype(np.float16),
    }
    outputs = ["swapped", "mask"]

    (served,) = asyncio.run(_infer_all(embedded_triton.grpc_url, "face_swapper", [inputs], outputs, shared_memory))
    local = asyncio.run(local_models.infer("face_swapper", inputs, outputs))

    assert served["swapped"].dtype == served["mask"].dtype == np.float16
    assert served["swapped"].shape == (2, 3, 256, 256)
    assert served["mask"].shape == (2, 1, 256, 256)
    np.testing.assert_array_equal(served["swapped"], local["swapped"])
    np.testing.assert_array_equal(served["mask"], local["mask"])


def test_shared_memory_regions_are_reused_added_when_outgrown_and_removed_on_close(
    embedded_triton: EmbeddedTriton,
) -> None:
    rng = np.random.default_rng(15)
    outputs = ["probability", "regression"]

    async def scenario() -> tuple[list[int], list[str]]:
        client = TritonClient(embedded_triton.grpc_url, TIMEOUT_SECONDS, shared_memory=True)
        counts = []
        try:
            # 24x24 crops: 80 of them outgrow the first 1 MiB region (input plus room for two outputs).
            for count in (2, 2, 80, 3):
                image = rng.uniform(0, 255, (count, 3, 24, 24)).astype(np.float32)
                answer = await client.infer("mtcnn_rnet", {"image": image}, outputs)
                assert answer["probability"].shape == (count, 2)
                counts.append(len(_own_regions()))
        finally:
            await client.close()
        return counts, _own_regions()

    counts, left = asyncio.run(scenario())
    # Requests one at a time reuse a region; the large one adds a second, the small one after it
    # takes the first again; close removes both.
    assert counts == [1, 1, 2, 2]
    assert left == []


def test_the_region_of_a_failed_request_is_not_reused_and_is_removed(embedded_triton: EmbeddedTriton) -> None:
    rng = np.random.default_rng(17)
    outputs = ["probability", "regression"]

    async def scenario() -> tuple[list[str], list[str]]:
        client = TritonClient(embedded_triton.grpc_url, TIMEOUT_SECONDS, shared_memory=True)
        try:
            wrong_channels = rng.uniform(0, 255, (2, 4, 24, 24)).astype(np.float32)
            with pytest.raises(InvalidArgument):
                await client.infer("mtcnn_rnet", {"image": wrong_channels}, outputs)
            after_failure = _own_regions()
            image = rng.uniform(0, 255, (2, 3, 24, 24)).astype(np.float32)
            await client.infer("mtcnn_rnet", {"image": image}, outputs)
            return after_failure, _own_regions()
        finally:
            await client.close()

    after_failure, after_next = asyncio.run(scenario())
    assert len(after_failure) == 1 and len(after_next) == 1
    # A late answer to the failed request could land in its region: the next request got a new one.
    assert after_next != after_failure


def test_a_server_that_cannot_map_the_region_gets_the_tensors_over_grpc(
    embedded_triton: EmbeddedTriton, local_models: LocalModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = triton_shared_memory.SharedMemoryRegion.__init__

    def region_the_server_cannot_open(region: triton_shared_memory.SharedMemoryRegion, byte_size: int) -> None:
        created(region, byte_size)
        region.key = "/swapline-no-such-region"

    monkeypatch.setattr(triton_shared_memory.SharedMemoryRegion, "__init__", region_the_server_cannot_open)
    image = np.random.default_rng(16).uniform(0, 255, (3, 3, 24, 24)).astype(np.float32)
    outputs = ["probability", "regression"]

    async def scenario() -> tuple[dict[str, np.ndarray], bool]:
        client = TritonClient(embedded_triton.grpc_url, TIMEOUT_SECONDS, shared_memory=True)
        try:
            answer = await client.infer("mtcnn_rnet", {"image": image}, outputs)
            return answer, client.uses_shared_memory
        finally:
            await client.close()

    answer, still_shared = asyncio.run(scenario())
    expected = asyncio.run(local_models.infer("mtcnn_rnet", {"image": image}, outputs))
    assert not still_shared
    np.testing.assert_allclose(answer["probability"], expected["probability"], atol=1e-5)
    assert _own_regions() == []


def test_metrics_endpoint_counts_inferences(embedded_triton: EmbeddedTriton) -> None:
    asyncio.run(
        _infer_all(
            embedded_triton.grpc_url,
            "mtcnn_rnet",
            [{"image": np.zeros((3, 3, 24, 24), np.float32)}],
            ["probability"],
        )
    )
    with urllib.request.urlopen(embedded_triton.metrics_url, timeout=TIMEOUT_SECONDS) as response:
        metrics = response.read().decode()
    assert 'nv_inference_count{model="mtcnn_rnet",version="1"}' in metrics


def test_a_model_that_cannot_load_fails_the_start_with_the_log(tmp_path: Path) -> None:
    repository = tmp_path / "production"
    (repository / "mtcnn_rnet" / "1").mkdir(parents=True)
    shutil.copy(PRODUCTION_REPOSITORY / "mtcnn_rnet/config.pbtxt", repository / "mtcnn_rnet/config.pbtxt")
    (repository / "mtcnn_rnet/1/model.onnx").write_bytes(b"this is not an onnx graph")
    triton = EmbeddedTriton(repository, tmp_path / "work", startup_timeout=60)

    with pytest.raises(Unavailable, match=r"(?s)exited with code.*failed to load 'mtcnn_rnet'.*Protobuf parsing"):
        triton.start()
    assert triton.pid is None


def test_stop_ends_the_server_cleanly(tmp_path: Path) -> None:
    triton = EmbeddedTriton(PRODUCTION_REPOSITORY, tmp_path / "work", models=["mtcnn_rnet"], startup_timeout=60)
    triton.start()
    pid = triton.pid
    assert pid is not None
    assert triton.alive()
    assert triton.models == ["mtcnn_rnet"]

    assert triton.stop() == 0

    assert not triton.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "successfully unloaded 'mtcnn_rnet'" in triton.log_path.read_text()


def test_a_relative_work_dir_is_resolved_before_the_server_changes_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    triton = EmbeddedTriton(Path("models"), Path("work"))
    assert triton.work_dir == tmp_path / "work" and triton.model_repository == tmp_path / "models"


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting for its reaper (a zombie holds no memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _existing(names: list[str]) -> list[str]:
    return [name for name in names if (Path("/dev/shm") / name).exists()]


async def _ready_within(client: TritonClient, model: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await client.is_model_ready(model):
            return True
        await asyncio.sleep(0.1)
    return False


def test_a_killed_server_is_cleaned_up_and_restarted_on_the_same_url(tmp_path: Path, local_models: LocalModels) -> None:
    triton = EmbeddedTriton(PRODUCTION_REPOSITORY, tmp_path / "work", models=["mtcnn_rnet"], startup_timeout=60)
    image = np.random.default_rng(18).uniform(0, 255, (3, 3, 24, 24)).astype(np.float32)
    # 80 crops and room for their outputs outgrow the first 1 MiB region.
    large = np.zeros((80, 3, 24, 24), np.float32)
    outputs = ["probability", "regression"]
    expected = asyncio.run(local_models.infer("mtcnn_rnet", {"image": image}, outputs))
    url = triton.grpc_url

    async def scenario(old_pid: int, old_stubs: list[int], old_regions: list[str]) -> dict[str, np.ndarray]:
        # One client throughout: its regions were registered with the server that is killed.
        client = TritonClient(url, TIMEOUT_SECONDS, shared_memory=True)
        try:
            await client.infer("mtcnn_rnet", {"image": image}, outputs)
            os.kill(old_pid, signal.SIGKILL)
            deadline = time.monotonic() + TIMEOUT_SECONDS
            while await asyncio.to_thread(triton.alive) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not triton.alive()
            # Noticing the death ended the stubs and removed the regions, before any restart.
            assert [pid for pid in old_stubs if _running(pid)] == []
            assert _existing(old_regions) == []
            started = time.monotonic()
            # Larger than the free region: each must register a new one. The free region stays
            # registered with the dead server only.
            refused = await asyncio.gather(
                *(client.infer("mtcnn_rnet", {"image": large}, outputs) for _ in range(2)), return_exceptions=True
            )
            assert [type(error) for error in refused] == [Unavailable, Unavailable]
            # Refused at once, not after the client's timeout, and retryable: shared memory stays on.
            assert time.monotonic() - started < 5
            assert client.uses_shared_memory

            await asyncio.to_thread(triton.restart)

            assert triton.grpc_url == url and triton.pid not in (None, old_pid)
            assert triton.alive()
            assert await _ready_within(client, "mtcnn_rnet", TIMEOUT_SECONDS)
            answer = await client.infer("mtcnn_rnet", {"image": image}, outputs)
            # Still through shared memory: the regions the killed server knew were registered anew
            # instead of failing the request as an unknown region or turning shared memory off.
            assert client.uses_shared_memory
            return answer
        finally:
            await client.close()

    triton.start()
    try:
        old_pid = triton.pid
        assert old_pid is not None
        old_stubs = [pid for pid in _children(old_pid) if "triton_python_backend_stub" in _command(pid)]
        old_regions = [path.name for path in triton.shared_memory_regions()]
        assert old_stubs and old_regions
        answer = asyncio.run(scenario(old_pid, old_stubs, old_regions))
        new_regions = [path.name for path in triton.shared_memory_regions()]
        assert new_regions and not set(new_regions) & set(old_regions)
    finally:
        triton.stop()
    np.testing.assert_allclose(answer["probability"], expected["probability"], atol=1e-5)
    assert _existing(new_regions) == []


def test_idle_shared_memory_regions_are_unregistered_and_unlinked_while_the_client_lives(
    embedded_triton: EmbeddedTriton,
) -> None:
    rng = np.random.default_rng(19)
    requests = [{"image": rng.uniform(0, 255, (count, 3, 24, 24)).astype(np.float32)} for count in (2, 80, 3, 150)]

    def registered_names(client: triton_grpc.InferenceServerClient) -> set[str]:
        status = client.get_system_shared_memory_status()
        return {region.name for region in status.regions.values()}

    async def scenario() -> tuple[list[str], set[str], list[str], set[str]]:
        client = TritonClient(
            embedded_triton.grpc_url, TIMEOUT_SECONDS, shared_memory=True, pool_limits=PoolLimits(idle_seconds=0.3)
        )
        status_client = triton_grpc.InferenceServerClient(embedded_triton.grpc_url)
        try:
            await asyncio.gather(*(client.infer("mtcnn_rnet", inputs, ["probability"]) for inputs in requests))
            in_use = _own_regions()
            registered = registered_names(status_client)
            # No further request: the pool's own sweep removes the idle regions.
            deadline = time.monotonic() + TIMEOUT_SECONDS
            while _own_regions() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return in_use, registered, _own_regions(), registered_names(status_client)
        finally:
            status_client.close()
            await client.close()

    in_use, registered, left, still_registered = asyncio.run(scenario())
    assert len(in_use) >= 2 and set(in_use) <= registered
    assert left == []
    assert not set(in_use) & still_registered

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.settings_loader import SettingsError, load_settings
from services.common.torch_catalog import BUILT_IN_FACTORIES
from services.common.triton_client import TritonClient
from services.triton import device_choice
from services.triton.device_choice import CudaProbe, DeviceDecision, probe_cuda, resolve_device
from services.triton.embedded_repository import (
    PYTHON_MODEL_SOURCE,
    TORCH_MODEL_SOURCE,
    TritonDevice,
    torch_config,
    write_embedded_repository,
    write_torch_model,
)
from services.triton.local_models import LocalModels
from services.triton.model_config import parse_model_config, read_model_config, repository_models, torch_weights_path
from services.triton.server_process import EmbeddedTriton, locate_pytriton, package_parent, server_environment
from services.triton.settings import ENV_PREFIX, TritonSettings, gpu_instances_from_env
from tests.triton.torch_stand_ins import STAND_IN_CONFIG

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
ALL_MODELS = repository_models(PRODUCTION_REPOSITORY)
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
STAND_INS = "tests.triton.torch_stand_ins"
TIMEOUT_SECONDS = 30.0
MIN_SWAPPER_PSNR_DB = 40.0


def _production_copy(tmp_path: Path, models: list[str], with_weights: bool) -> Path:
    repository = tmp_path / "production"
    for model in models:
        (repository / model / "1").mkdir(parents=True)
        shutil.copy(PRODUCTION_REPOSITORY / model / "config.pbtxt", repository / model / "config.pbtxt")
        (repository / model / "1" / "model.onnx").write_bytes(b"onnx bytes of " + model.encode())
        if with_weights:
            (repository / model / "1" / "model.pt").write_bytes(b"state dict of " + model.encode())
    return repository


def _written_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("model", ALL_MODELS)
def test_cuda_config_is_a_gpu_torch_model_with_the_same_contract(model: str) -> None:
    production = read_model_config(PRODUCTION_REPOSITORY, model)

    derived = torch_config(production, BUILT_IN_FACTORIES[model], "fp16", "cuda")

    assert derived.backend == "python" and not derived.platform
    assert not derived.HasField("optimization")
    assert [(group.kind, group.count) for group in derived.instance_group] == [(KIND_GPU, 1)]
    assert derived.parameters["torch_factory"].string_value == BUILT_IN_FACTORIES[model]
    assert derived.parameters["torch_precision"].string_value == "fp16"
    assert derived.max_batch_size == production.max_batch_size > 0
    assert list(derived.input) == list(production.input)
    assert list(derived.output) == list(production.output)
    assert derived.dynamic_batching == production.dynamic_batching
    assert derived.dynamic_batching.max_queue_delay_microseconds > 0
    more = torch_config(production, BUILT_IN_FACTORIES[model], "fp16", "cuda", gpu_instances=3)
    assert [(group.kind, group.count) for group in more.instance_group] == [(KIND_GPU, 3)]
    # Production keeps its own backend: onnxruntime with TensorRT, or TorchScript for the cascade.
    assert (production.backend, production.platform) in {("onnxruntime", ""), ("", "pytorch_libtorch")}


def test_a_torch_model_on_the_cpu_batches_without_waiting() -> None:
    production = read_model_config(PRODUCTION_REPOSITORY, "face_swapper")
    derived = torch_config(production, BUILT_IN_FACTORIES["face_swapper"], "fp32", "cpu", gpu_instances=4)
    assert [(group.kind, group.count) for group in derived.instance_group] == [(KIND_CPU, 1)]
    assert derived.dynamic_batching.max_queue_delay_microseconds == 0
    assert derived.parameters["torch_precision"].string_value == "fp32"


def test_torch_configs_refuse_what_cannot_be_served() -> None:
    production = read_model_config(PRODUCTION_REPOSITORY, "mtcnn_rnet")
    factory = BUILT_IN_FACTORIES["mtcnn_rnet"]
    with pytest.raises(InvalidArgument, match="triton device 'tpu'"):
        torch_config(production, factory, "fp16", "tpu")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="torch precision 'int8'"):
        torch_config(production, factory, "int8", "cuda")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="gpu_instances is 0; a model needs at least one instance"):
        torch_config(production, factory, "fp16", "cuda", gpu_instances=0)
    unbatched = model_config_pb2.ModelConfig()
    unbatched.CopyFrom(production)
    unbatched.max_batch_size = 0
    with pytest.raises(InvalidArgument, match="model mtcnn_rnet has no batch dimension"):
        torch_config(unbatched, factory, "fp16", "cuda")


def test_the_cuda_repository_serves_every_built_in_model_from_torch(tmp_path: Path) -> None:
    production = _production_copy(tmp_path, ALL_MODELS, with_weights=True)
    out = tmp_path / "embedded"

    assert write_embedded_repository(production, out, device="cuda", gpu_instances=2) == ALL_MODELS

    for model in ALL_MODELS:
        config = _written_config(out / model)
        assert (config.name, config.backend) == (model, "python")
        assert [(group.kind, group.count) for group in config.instance_group] == [(KIND_GPU, 2)]
        assert config.parameters["torch_factory"].string_value == BUILT_IN_FACTORIES[model]
        # The FP32 twin computes in FP32 whatever the stack's precision: that is what it is for.
        assert config.parameters["torch_precision"].string_value == ("fp32" if model.endswith("_fp32") else "fp16")
        assert (out / model / "1" / "model.py").read_text() == TORCH_MODEL_SOURCE.read_text()
        assert (out / model / "1" / "model.pt").read_bytes() == b"state dict of " + model.encode()
        assert not (out / model / "1" / "model.onnx").exists()
    assert not [path for path in out.rglob("*") if path.name.endswith(".part")]


def test_the_cuda_repository_needs_the_built_weights(tmp_path: Path) -> None:
    production = _production_copy(tmp_path, ["mtcnn_onet"], with_weights=False)
    with pytest.raises(FailedPrecondition, match=r"mtcnn_onet has no .*model\.pt; run `make models`"):
        write_embedded_repository(production, tmp_path / "embedded", device="cuda")
    # The CPU repository never needed them.
    assert write_embedded_repository(production, tmp_path / "embedded", device="cpu") == ["mtcnn_onet"]


def test_a_model_without_a_torch_definition_keeps_onnxruntime_on_cuda(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    production = _production_copy(tmp_path, ["mtcnn_rnet"], with_weights=True)
    shutil.copytree(production / "mtcnn_rnet", production / "user_model")
    config_path = production / "user_model" / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace('name: "mtcnn_rnet"', 'name: "user_model"'))
    out = tmp_path / "embedded"

    with caplog.at_level(logging.WARNING, logger="services.triton.embedded_repository"):
        write_embedded_repository(production, out, device="cuda", gpu_instances=3)

    assert "model user_model has no torch definition" in caplog.text
    assert (out / "user_model" / "1" / "model.py").read_text() == PYTHON_MODEL_SOURCE.read_text()
    assert [(group.kind, group.count) for group in _written_config(out / "user_model").instance_group] == [
        (KIND_CPU, 1)
    ]
    assert (out / "mtcnn_rnet" / "1" / "model.py").read_text() == TORCH_MODEL_SOURCE.read_text()


def test_a_torch_model_without_weights_has_no_model_pt(tmp_path: Path) -> None:
    config = parse_model_config(STAND_IN_CONFIG)
    weights = tmp_path / "trained.pt"
    weights.write_bytes(b"weights")
    factory = f"{STAND_INS}:new_doubler"

    with_weights = write_torch_model(tmp_path / "out", "doubler", config, factory, weights, "tf32", "cuda")
    assert (with_weights / "1" / "model.pt").read_bytes() == b"weights"
    without = write_torch_model(tmp_path / "out", "doubler", config, factory, None, "tf32", "cuda", gpu_instances=2)

    assert without == with_weights == tmp_path / "out" / "doubler"
    assert not (without / "1" / "model.pt").exists()
    written = _written_config(without)
    assert written.name == "doubler"
    assert [group.count for group in written.instance_group] == [2]
    assert written.parameters["torch_precision"].string_value == "tf32"


def _never_probed() -> CudaProbe:
    raise AssertionError("a configured device must not be probed")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_configured_device_is_taken_as_it_is(device: TritonDevice) -> None:
    assert resolve_device(device, _never_probed) == DeviceDecision(device, "as configured")


@pytest.mark.parametrize(("available", "device"), [(True, "cuda"), (False, "cpu")])
def test_auto_follows_the_probe_and_logs_why(
    available: bool, device: TritonDevice, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="services.triton.device_choice"):
        decision = resolve_device("auto", lambda: CudaProbe(available, "the probe's reason"))
    assert decision == DeviceDecision(device, "the probe's reason")
    assert f"triton serves the models on {device}: the probe's reason" in caplog.text


def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture()
def nvidia_dev(tmp_path: Path) -> Path:
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "nvidia0").touch()
    return devices


def test_without_an_nvidia_device_no_child_is_started(tmp_path: Path) -> None:
    (tmp_path / "nvidiactl").touch()
    found = probe_cuda(tmp_path, python=_fake_python(tmp_path, "echo 1"))
    assert found == CudaProbe(False, f"no NVIDIA device in {tmp_path}")


def test_without_torch_the_answer_is_cpu(nvidia_dev: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = device_choice.importlib.util.find_spec
    monkeypatch.setattr(
        device_choice.importlib.util, "find_spec", lambda name: None if name == "torch" else find_spec(name)
    )
    assert probe_cuda(nvidia_dev, python=_fake_python(nvidia_dev.parent, "echo 1")) == CudaProbe(
        False, "torch is not installed"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("echo 2", CudaProbe(True, "torch sees 2 CUDA device(s)", 2)),
        ("echo 0", CudaProbe(False, "torch sees no CUDA device")),
        ("echo 'no driver' >&2; exit 3", CudaProbe(False, "torch's CUDA check failed with code 3: no driver")),
        ("echo maybe", CudaProbe(False, "torch's CUDA check answered 'maybe'")),
    ],
)
def test_the_probe_reads_the_childs_answer(nvidia_dev: Path, body: str, expected: CudaProbe) -> None:
    assert probe_cuda(nvidia_dev, python=_fake_python(nvidia_dev.parent, body)) == expected


def test_a_probe_that_hangs_gives_up(nvidia_dev: Path) -> None:
    found = probe_cuda(nvidia_dev, python=_fake_python(nvidia_dev.parent, "exec sleep 30"), timeout=0.5)
    assert found == CudaProbe(False, "torch's CUDA check did not answer within 0.5 s")


def test_the_probe_script_prints_torchs_device_count(capsys: pytest.CaptureFixture[str]) -> None:
    # Run here rather than in a child: the child's side is tested above, and torch is already imported.
    exec(device_choice.PROBE_SCRIPT)
    assert capsys.readouterr().out == f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}\n"


def test_the_device_setting_is_read_and_checked() -> None:
    assert load_settings(TritonSettings, ENV_PREFIX, {}).device == "auto"
    assert load_settings(TritonSettings, ENV_PREFIX, {"SWAPLINE_TRITON_DEVICE": "cuda"}).device == "cuda"
    with pytest.raises(SettingsError, match="SWAPLINE_TRITON_DEVICE='gpu' is not one of auto, cpu, cuda"):
        load_settings(TritonSettings, ENV_PREFIX, {"SWAPLINE_TRITON_DEVICE": "gpu"})


def test_the_gpu_instances_setting_is_read_and_checked() -> None:
    assert load_settings(TritonSettings, ENV_PREFIX, {}).gpu_instances == 1
    assert load_settings(TritonSettings, ENV_PREFIX, {"SWAPLINE_TRITON_GPU_INSTANCES": "4"}).gpu_instances == 4
    with pytest.raises(SettingsError, match="SWAPLINE_TRITON_GPU_INSTANCES=0 must be at least 1"):
        load_settings(TritonSettings, ENV_PREFIX, {"SWAPLINE_TRITON_GPU_INSTANCES": "0"})
    with pytest.raises(SettingsError, match="SWAPLINE_TRITON_GPU_INSTANCES=17 must be at most 16"):
        load_settings(TritonSettings, ENV_PREFIX, {"SWAPLINE_TRITON_GPU_INSTANCES": "17"})


def test_a_process_running_triton_itself_checks_only_the_gpu_instances_variable() -> None:
    assert gpu_instances_from_env({}) == 1
    # The embedded stack reads no other SWAPLINE_TRITON_* variable, so a wrong one is not its to refuse.
    assert gpu_instances_from_env({"SWAPLINE_TRITON_GPU_INSTANCES": "3", "SWAPLINE_TRITON_DEVICE": "gpu"}) == 3
    with pytest.raises(SettingsError, match="SWAPLINE_TRITON_GPU_INSTANCES=99 must be at most 16"):
        gpu_instances_from_env({"SWAPLINE_TRITON_GPU_INSTANCES": "99"})


def test_embedded_triton_writes_its_gpu_instances_into_the_cuda_twins(tmp_path: Path) -> None:
    production = _production_copy(tmp_path, ["face_swapper"], with_weights=True)
    triton = EmbeddedTriton(production, tmp_path / "work", gpu_instances=5)
    out = tmp_path / "served"
    out.mkdir()
    assert triton.repository_writer(out, "cuda") == ["face_swapper"]
    assert [group.count for group in _written_config(out / "face_swapper").instance_group] == [5]


def test_the_stubs_find_torch() -> None:
    torch_parent = package_parent("torch")
    assert torch_parent == str(Path(torch.__file__).parents[1])
    assert package_parent("no_such_package_here") is None
    environment = server_environment(locate_pytriton(), {"PYTHONPATH": "/elsewhere"})
    assert torch_parent in environment["PYTHONPATH"].split(":")
    assert environment["PYTHONPATH"].endswith(":/elsewhere")


def _psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float32) - expected.astype(np.float32)) ** 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def test_tritonserver_serves_the_torch_definition_as_the_onnx_file(tmp_path: Path, local_models: LocalModels) -> None:
    swapper_config = read_model_config(PRODUCTION_REPOSITORY, "face_swapper")

    def torch_swapper_on(out: Path, device: TritonDevice) -> list[str]:
        weights = torch_weights_path(PRODUCTION_REPOSITORY, "face_swapper")
        write_torch_model(
            out, "face_swapper", swapper_config, BUILT_IN_FACTORIES["face_swapper"], weights, "fp16", device
        )
        return ["face_swapper"]

    rng = np.random.default_rng(31)
    requests = [
        {name: rng.uniform(0, 1, (batch, 3, 256, 256)).astype(np.float16) for name in ("target", "source")}
        for batch in (1, 2)
    ]
    outputs = ["swapped", "mask"]

    async def scenario(url: str) -> list[dict[str, np.ndarray]]:
        client = TritonClient(url, TIMEOUT_SECONDS)
        try:
            return list(await asyncio.gather(*(client.infer("face_swapper", inputs, outputs) for inputs in requests)))
        finally:
            await client.close()

    with EmbeddedTriton(
        PRODUCTION_REPOSITORY, tmp_path / "work", device="cpu", repository_writer=torch_swapper_on, startup_timeout=60
    ) as triton:
        assert (triton.device, triton.models) == ("cpu", ["face_swapper"])
        served_by = triton.work_dir / "model_repository" / "face_swapper" / "1" / "model.py"
        assert served_by.read_text() == TORCH_MODEL_SOURCE.read_text()
        answers = asyncio.run(scenario(triton.grpc_url))

    for inputs, answer in zip(requests, answers, strict=True):
        expected = asyncio.run(local_models.infer("face_swapper", inputs, outputs))
        assert answer["swapped"].dtype == answer["mask"].dtype == np.float16
        assert answer["swapped"].shape == expected["swapped"].shape
        np.testing.assert_array_equal(answer["mask"], expected["mask"])
        for served_image, onnx_image in zip(answer["swapped"], expected["swapped"], strict=True):
            assert _psnr(served_image, onnx_image) > MIN_SWAPPER_PSNR_DB

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.torch_catalog import (
    BUILT_IN_FACTORIES,
    TORCH_PRECISIONS,
    TORCH_WEIGHTS_FILE,
    TorchPrecision,
    parse_torch_precision,
)
from services.common.torch_runtime import TorchModel, load_torch_model, run_requests, save_state_dict, use_precision
from services.model_build.__main__ import write_torch_weights
from services.model_build.mtcnn_export import load_stage
from services.model_build.torch_models import TorchModelRunner, torch_model_from_config
from services.triton.model_config import onnx_path, parse_model_config, repository_models, torch_weights_path
from tests.triton import torch_stand_ins
from tests.triton.torch_stand_ins import STAND_IN_CONFIG

REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
WEIGHTS_WHEEL = Path(__file__).resolve().parents[2] / "build/weights/facenet_pytorch-2.6.0-py3-none-any.whl"
CPU = torch.device("cpu")
STAND_INS = "tests.triton.torch_stand_ins"
MTCNN_INPUT_SHAPES = {"mtcnn_pnet": (3, 3, 57, 91), "mtcnn_rnet": (5, 3, 24, 24), "mtcnn_onet": (7, 3, 48, 48)}
MTCNN_OUTPUTS = {
    "mtcnn_pnet": ["probability", "regression"],
    "mtcnn_rnet": ["probability", "regression"],
    "mtcnn_onet": ["probability", "regression", "landmarks"],
}
MIN_SWAPPER_PSNR_DB = 40.0


def _stand_in(module: torch.nn.Module, precision: TorchPrecision = "fp32", name: str = "stand_in") -> TorchModel:
    return torch_model_from_config(name, module, parse_model_config(STAND_IN_CONFIG), CPU, precision)


def _images(*batches: int, dtype: type[np.floating] = np.float16) -> list[np.ndarray]:
    rng = np.random.default_rng(21)
    return [rng.uniform(0, 1, (batch, 3, 4, 4)).astype(dtype) for batch in batches]


def _psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float32) - expected.astype(np.float32)) ** 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def fp32_runner() -> TorchModelRunner:
    return TorchModelRunner.built_in(REPOSITORY, CPU, "fp32")


def test_every_configured_model_has_a_torch_definition_and_built_weights() -> None:
    assert sorted(BUILT_IN_FACTORIES) == repository_models(REPOSITORY)
    for name in BUILT_IN_FACTORIES:
        assert torch_weights_path(REPOSITORY, name) == REPOSITORY / name / "1" / TORCH_WEIGHTS_FILE
        assert torch_weights_path(REPOSITORY, name).is_file(), f"{name}: run `make models`"


@pytest.mark.parametrize("model", sorted(MTCNN_INPUT_SHAPES))
def test_mtcnn_torch_definitions_answer_as_their_onnx_files(fp32_runner: TorchModelRunner, model: str) -> None:
    image = np.random.default_rng(7).uniform(0, 255, MTCNN_INPUT_SHAPES[model]).astype(np.float32)
    outputs = MTCNN_OUTPUTS[model]
    session = ort.InferenceSession(str(onnx_path(REPOSITORY, model)), providers=["CPUExecutionProvider"])

    expected = dict(zip(outputs, session.run(outputs, {"image": image}), strict=True))
    served = asyncio.run(fp32_runner.infer(model, {"image": image}, outputs))

    for name in outputs:
        assert served[name].dtype == np.float32
        assert served[name].shape == expected[name].shape
        np.testing.assert_allclose(served[name], expected[name], atol=1e-4, rtol=0)


def test_fp16_swapper_answers_as_its_onnx_file_by_psnr() -> None:
    runner = TorchModelRunner.built_in(REPOSITORY, CPU, "fp16", ["face_swapper"])
    rng = np.random.default_rng(8)
    inputs = {name: rng.uniform(0, 1, (3, 3, 256, 256)).astype(np.float16) for name in ("target", "source")}
    session = ort.InferenceSession(str(onnx_path(REPOSITORY, "face_swapper")), providers=["CPUExecutionProvider"])

    swapped, mask = session.run(["swapped", "mask"], inputs)
    served = asyncio.run(runner.infer("face_swapper", inputs, ["swapped", "mask"]))

    assert served["swapped"].dtype == served["mask"].dtype == np.float16
    np.testing.assert_array_equal(served["mask"], mask)
    # Not equal to the ONNX file already: a wrong blend or lighting would be far below the bar.
    assert not np.array_equal(served["swapped"], inputs["target"])
    for served_image, onnx_image in zip(served["swapped"], swapped, strict=True):
        assert _psnr(served_image, onnx_image) > MIN_SWAPPER_PSNR_DB


def test_requests_of_one_shape_run_as_one_forward_pass_and_are_split_back() -> None:
    module = torch_stand_ins.Doubler()
    model = _stand_in(module)
    images = _images(1, 3, 2)

    answers = run_requests(model, [{"image": image} for image in images])

    assert module.calls == 1
    assert [answer["doubled"].shape[0] for answer in answers] == [1, 3, 2]
    for image, answer in zip(images, answers, strict=True):
        np.testing.assert_allclose(answer["doubled"], image.astype(np.float32) * 2, rtol=1e-3)
        np.testing.assert_allclose(answer["total"][:, 0], image.astype(np.float32).sum(axis=(1, 2, 3)) * 2, rtol=1e-5)
        assert all(array.flags.c_contiguous for array in answer.values())


@pytest.mark.parametrize(
    ("precision", "given", "computed"),
    [
        ("fp32", np.float16, torch.float32),
        ("tf32", np.float16, torch.float32),
        ("fp16", np.float16, torch.float16),
        ("fp16", np.float32, torch.float16),
    ],
)
def test_inputs_are_cast_to_the_precision_and_outputs_to_the_config(
    precision: TorchPrecision, given: type[np.floating], computed: torch.dtype
) -> None:
    module = torch_stand_ins.Doubler()
    model = _stand_in(module, precision)

    (answer,) = run_requests(model, [{"image": _images(2, dtype=given)[0]}])

    assert module.seen_dtypes == [computed]
    assert module.scale.dtype == computed
    assert answer["doubled"].dtype == np.float16
    assert answer["total"].dtype == np.float32


def test_answers_never_share_memory_with_the_inputs() -> None:
    model = _stand_in(torch_stand_ins.PassesThrough(), "fp16")
    image = _images(2)[0]

    (answer,) = run_requests(model, [{"image": image}])

    np.testing.assert_array_equal(answer["doubled"], image)
    assert not np.shares_memory(answer["doubled"], image)


def test_a_module_returning_too_few_outputs_fails_naming_the_model() -> None:
    model = _stand_in(torch_stand_ins.OneOutputShort(), name="short_model")
    with pytest.raises(FailedPrecondition, match=r"model short_model returned 1 outputs; .* 2 \(doubled, total\)"):
        run_requests(model, [{"image": _images(2)[0]}])


def test_a_module_dropping_an_item_fails_naming_the_model() -> None:
    model = _stand_in(torch_stand_ins.DropsAnItem(), name="dropper")
    with pytest.raises(
        FailedPrecondition, match=r"model dropper returned 'doubled' of shape \(1, 3, 4, 4\) for a batch"
    ):
        run_requests(model, [{"image": _images(2)[0]}])


def test_inputs_that_disagree_on_the_batch_size_are_refused(fp32_runner: TorchModelRunner) -> None:
    crops = {"target": np.zeros((2, 3, 256, 256), np.float16), "source": np.zeros((3, 3, 256, 256), np.float16)}
    with pytest.raises(InvalidArgument, match=r"model face_swapper needs inputs of one batch size"):
        asyncio.run(fp32_runner.infer("face_swapper", crops, ["swapped"]))


def test_the_runner_answers_only_what_was_asked_and_names_what_it_lacks(fp32_runner: TorchModelRunner) -> None:
    image = np.zeros((2, 3, 24, 24), np.float32)
    answer = asyncio.run(fp32_runner.infer("mtcnn_rnet", {"image": image}, ["regression"]))
    assert list(answer) == ["regression"] and answer["regression"].shape == (2, 4)

    with pytest.raises(NotFound, match="model no_such_model is not loaded"):
        asyncio.run(fp32_runner.infer("no_such_model", {"image": image}, ["regression"]))
    with pytest.raises(InvalidArgument, match=r"model mtcnn_rnet has no outputs \['landmarks'\]"):
        asyncio.run(fp32_runner.infer("mtcnn_rnet", {"image": image}, ["landmarks"]))
    with pytest.raises(InvalidArgument, match=r"model mtcnn_rnet takes inputs \['image'\], was given \['pixels'\]"):
        asyncio.run(fp32_runner.infer("mtcnn_rnet", {"pixels": image}, ["regression"]))


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("fp16", False)])
def test_only_tf32_allows_tf32(precision: TorchPrecision, tf32: bool) -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        use_precision(precision)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_precisions_parse_and_unknown_ones_are_named() -> None:
    assert [parse_torch_precision(text) for text in TORCH_PRECISIONS] == list(TORCH_PRECISIONS)
    with pytest.raises(InvalidArgument, match=r"'bf16' is not one of fp16, fp32, tf32"):
        parse_torch_precision("bf16")


def test_saved_weights_load_into_the_factorys_module(tmp_path: Path) -> None:
    trained = torch_stand_ins.Doubler()
    with torch.no_grad():
        trained.scale.fill_(5.0)

    path = save_state_dict(trained, tmp_path / "model.pt")

    assert [entry.name for entry in tmp_path.iterdir()] == ["model.pt"]
    assert load_torch_model(f"{STAND_INS}:new_doubler", path).state_dict()["scale"].item() == 5.0
    assert load_torch_model(f"{STAND_INS}:new_doubler", None).state_dict()["scale"].item() == 2.0


@pytest.mark.parametrize(
    ("factory", "complaint"),
    [
        ("no_function_named", "is not 'python.module:function'"),
        (f"{STAND_INS}:no_such_function", "cannot be imported"),
        ("tests.no_such_module:new_doubler", "cannot be imported"),
        (f"{STAND_INS}:new_not_a_module", "returned a str, not an nn.Module"),
    ],
)
def test_a_factory_that_gives_no_module_is_named(factory: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        load_torch_model(factory, None)


def test_weights_that_do_not_fit_or_do_not_exist_are_named(tmp_path: Path) -> None:
    path = save_state_dict(torch_stand_ins.Doubler(), tmp_path / "model.pt")
    with pytest.raises(InvalidArgument, match=r"do not fit .*new_mtcnn_pnet"):
        load_torch_model(BUILT_IN_FACTORIES["mtcnn_pnet"], path)
    with pytest.raises(FailedPrecondition, match=r"missing.pt .* do not exist"):
        load_torch_model(f"{STAND_INS}:new_doubler", tmp_path / "missing.pt")


def test_make_models_writes_every_built_in_models_state_dict(tmp_path: Path) -> None:
    written = write_torch_weights(WEIGHTS_WHEEL, tmp_path)
    # The cascade's weights come with its TorchScript file (write_mtcnn_cascade, test_mtcnn_cascade.py).
    per_model = {name: factory for name, factory in BUILT_IN_FACTORIES.items() if name != "mtcnn_cascade"}

    assert sorted(written) == sorted(torch_weights_path(tmp_path, name) for name in per_model)
    for name, factory in per_model.items():
        loaded = load_torch_model(factory, torch_weights_path(tmp_path, name)).state_dict()
        assert loaded, name
        if name.startswith("mtcnn_"):
            trained = load_stage(WEIGHTS_WHEEL, name.removeprefix("mtcnn_")).state_dict()  # type: ignore[arg-type]
            assert all(torch.equal(loaded[key], trained[key]) for key in trained)
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".part")]

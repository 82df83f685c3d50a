from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.torch_runtime import load_torch_model
from services.model_build.inswapper_standin import (
    CROP_SIDE,
    ENCODER_WIDTHS,
    INPUT_NAMES,
    INSWAPPER_MULTIPLY_ADDS,
    INSWAPPER_PARAMETERS,
    LATENT_SIZE,
    OUTPUT_NAMES,
    STANDIN_LABEL,
    TINY_WIDTH,
    example_inputs,
    export_inswapper_standin,
    new_inswapper_standin,
    new_tiny_inswapper_standin,
    scaled_widths,
    standin_multiply_adds,
    standin_parameter_count,
)

FULL_FACTORY = "services.model_build.inswapper_standin:new_inswapper_standin"
TINY_FACTORY = "services.model_build.inswapper_standin:new_tiny_inswapper_standin"


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return new_tiny_inswapper_standin()


def _run(module: torch.nn.Module, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        output: torch.Tensor = module(target, source)
    return output


def test_full_width_has_inswapper_128s_parameter_count_without_allocating_it() -> None:
    count = standin_parameter_count()
    assert abs(count - INSWAPPER_PARAMETERS) / INSWAPPER_PARAMETERS < 0.01
    # About 554 MB of FP32 weights, as inswapper_128.onnx.
    assert 540e6 < count * 4 < 570e6


def test_full_width_costs_what_inswapper_128_costs_a_face() -> None:
    assert abs(standin_multiply_adds() - INSWAPPER_MULTIPLY_ADDS) / INSWAPPER_MULTIPLY_ADDS < 0.01
    assert standin_multiply_adds(TINY_WIDTH) < standin_multiply_adds() / 500


def test_the_meta_count_is_the_built_models_count(tiny: torch.nn.Module) -> None:
    assert standin_parameter_count(TINY_WIDTH) == sum(parameter.numel() for parameter in tiny.parameters())


def test_the_full_factory_loads_by_name_as_an_fp32_module_in_eval_mode() -> None:
    module = load_torch_model(FULL_FACTORY, None)
    parameters = list(module.parameters())
    assert sum(parameter.numel() for parameter in parameters) == standin_parameter_count()
    assert {parameter.dtype for parameter in parameters} == {torch.float32}
    assert not module.training


def test_contract_float32_crops_and_latents_in_a_crop_in_0_to_1_out(tiny: torch.nn.Module) -> None:
    target, source = example_inputs(3)
    assert target.shape == (3, 3, CROP_SIDE, CROP_SIDE) and source.shape == (3, LATENT_SIZE)
    assert torch.allclose(source.norm(dim=1), torch.ones(3))
    output = _run(tiny, target, source)
    assert output.shape == (3, 3, CROP_SIDE, CROP_SIDE) and output.dtype == torch.float32
    assert output.min() >= 0 and output.max() <= 1


def test_outputs_spread_over_0_to_1_so_an_fp16_error_cannot_hide_at_tanhs_ends(tiny: torch.nn.Module) -> None:
    output = _run(tiny, *example_inputs(4))
    saturated = ((output < 0.01) | (output > 0.99)).float().mean()
    assert output.std() > 0.15 and saturated < 0.1


def test_the_identity_latent_changes_the_output(tiny: torch.nn.Module) -> None:
    target, source = example_inputs(4)
    swapped_identities = _run(tiny, target, source.roll(1, dims=0))
    assert (_run(tiny, target, source) - swapped_identities).abs().mean() > 0.05


def test_weights_are_fixed_by_the_seed() -> None:
    first, again, other = (new_inswapper_standin(TINY_WIDTH, seed) for seed in (0, 0, 1))
    inputs = example_inputs(2)
    assert torch.equal(_run(first, *inputs), _run(again, *inputs))
    assert not torch.equal(_run(first, *inputs), _run(other, *inputs))


def test_width_multiplier_scales_every_channel_count(tiny: torch.nn.Module) -> None:
    assert scaled_widths(1.0) == ENCODER_WIDTHS == (128, 256, 512, 1024)
    assert scaled_widths(TINY_WIDTH) == (4, 8, 16, 32)
    convolutions = [layer for layer in tiny.modules() if isinstance(layer, torch.nn.Conv2d)]
    assert max(layer.out_channels for layer in convolutions) == 32
    assert standin_parameter_count(TINY_WIDTH) < standin_parameter_count(0.5) < standin_parameter_count()
    for width in (0.0, -1.0, 1.5):
        with pytest.raises(InvalidArgument):
            scaled_widths(width)


def test_it_says_it_is_a_stand_in() -> None:
    assert "stand-in" in STANDIN_LABEL and "random weights" in STANDIN_LABEL


def test_the_tiny_factory_loads_by_name(tiny: torch.nn.Module) -> None:
    module = load_torch_model(TINY_FACTORY, None)
    inputs = example_inputs(2)
    assert torch.equal(_run(module, *inputs), _run(tiny, *inputs))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_twins_keep_the_float32_contract_with_a_dynamic_batch(tmp_path: Path, tiny: torch.nn.Module) -> None:
    fp32 = export_inswapper_standin(tmp_path / "fp32" / "model.onnx", "fp32", TINY_WIDTH)
    fp16 = export_inswapper_standin(tmp_path / "fp16" / "model.onnx", "fp16", TINY_WIDTH)
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["fp16", "fp32", "model.onnx", "model.onnx"]
    target, source = example_inputs(3)
    expected = _run(tiny, target, source).numpy()
    feeds = {INPUT_NAMES[0]: target.numpy(), INPUT_NAMES[1]: source.numpy()}
    answers = {}
    for precision, path in (("fp32", fp32), ("fp16", fp16)):
        graph = onnx.load(str(path)).graph
        assert [tensor.name for tensor in graph.input] == list(INPUT_NAMES)
        assert [tensor.name for tensor in graph.output] == list(OUTPUT_NAMES)
        float32 = onnx.TensorProto.FLOAT
        assert {tensor.type.tensor_type.elem_type for tensor in [*graph.input, *graph.output]} == {float32}
        weights = {initializer.data_type for initializer in graph.initializer}
        assert weights == ({onnx.TensorProto.FLOAT16} if precision == "fp16" else {float32})
        (answers[precision],) = _session(path).run(None, feeds)
    np.testing.assert_allclose(answers["fp32"], expected, atol=1e-4)
    mse = float(np.mean((answers["fp16"].astype(np.float64) - expected) ** 2))
    assert 10 * np.log10(1.0 / mse) > 40.0


def test_export_refuses_an_unknown_precision(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        export_inswapper_standin(tmp_path / "model.onnx", "int8", TINY_WIDTH)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []

"""The embedding-conditioned swapper against a recording model runner: what each model is sent, and how
its answers become crops, masks and FP32 fallbacks. Names and ranges are written here from the issue's
contract (inswapper: 0..1 crops, hyperswap: -1..1, ArcFace: x / 127.5 - 1), not taken from the code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from services.common.errors import FailedPrecondition
from services.common.face_model_catalog import EMBEDDING_SWAPPERS
from services.worker.embedding_swapper import EmbeddingSwapper, box_mask
from services.worker.face_swapper import SourceIdentity

Answer = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
EMBEDDING = np.linspace(-1.0, 1.0, 512, dtype=np.float32)


@dataclass
class RecordingModels:
    answers: dict[str, Answer]
    outputs: dict[str, tuple[str, ...]]
    calls: list[tuple[str, dict[str, np.ndarray]]] = field(default_factory=list)

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.calls.append((model, {name: np.array(value) for name, value in inputs.items()}))
        if model not in self.answers:
            raise FailedPrecondition(f"triton model {model}: unknown model")
        return self.answers[model](inputs)

    async def output_names(self, model: str) -> tuple[str, ...]:
        return self.outputs[model]

    async def is_model_ready(self, model: str) -> bool:
        return model in self.answers


def models(swapper: str, swap: Answer, twin: Answer | None = None) -> RecordingModels:
    answers: dict[str, Answer] = {
        # Exporter-given output names: the swapper reads them from Triton's config, by position.
        "arcface_w600k_r50": lambda inputs: {"683": EMBEDDING[None] * 3.0},
        f"{swapper}_source": lambda inputs: {"source": inputs["embedding"] * 2.0},
        swapper: swap,
    }
    if twin is not None:
        answers[f"{swapper}_fp32"] = twin
    outputs: dict[str, tuple[str, ...]] = {
        "arcface_w600k_r50": ("683",),
        swapper: ("output",),
        f"{swapper}_fp32": ("output",),
    }
    return RecordingModels(answers, outputs)


def echo(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"output": np.array(inputs["target"], np.float32)}


def crops(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_the_source_is_embedded_by_arcface_then_converted_by_the_swappers_own_model() -> None:
    runner = models("inswapper_128", echo)
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["inswapper_128"])
    face = crops(1, 112)[0]
    identity = asyncio.run(swapper.prepare_source(face))
    (arcface, sent), (converter, converted) = runner.calls
    assert (arcface, converter) == ("arcface_w600k_r50", "inswapper_128_source")
    assert sent["input"].shape == (1, 3, 112, 112) and sent["input"].dtype == np.float32
    np.testing.assert_allclose(sent["input"][0, 0], face[:, :, 0] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(converted["embedding"][0], EMBEDDING * 3.0)
    assert identity.embedding is not None
    np.testing.assert_allclose(identity.embedding, EMBEDDING * 6.0)


def test_the_layouts_are_facefusions_templates_at_the_models_sizes() -> None:
    runner = models("hyperswap_1a_256", echo)
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["hyperswap_1a_256"])
    assert (swapper.target_layout.size, swapper.source_layout.size) == (256, 112)
    assert swapper.target_layout.template[0, 0] == pytest.approx(0.36167656)
    assert swapper.source_layout.template[0, 0] == pytest.approx(0.34191607)


def test_inswapper_crops_go_in_and_come_back_in_zero_to_one_with_the_box_mask() -> None:
    runner = models("inswapper_128", echo)
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["inswapper_128"])
    targets = crops(3, 128, seed=2)
    swapped = asyncio.run(swapper.swap(targets, SourceIdentity(crop=crops(1, 112)[0], embedding=EMBEDDING)))
    ((model, sent),) = runner.calls
    assert model == "inswapper_128"
    assert sent["target"].dtype == np.float32 and sent["target"].shape == (3, 3, 128, 128)
    np.testing.assert_allclose(sent["target"][2, 1], targets[2, :, :, 1] / 255.0, atol=1e-3)
    np.testing.assert_array_equal(sent["source"], np.broadcast_to(EMBEDDING, (3, 512)))
    assert int(np.abs(swapped.crops.astype(int) - targets.astype(int)).max()) <= 1
    np.testing.assert_allclose(swapped.masks, np.broadcast_to(box_mask(128), (3, 128, 128)))
    assert swapped.fp32_fallbacks == 0


def test_hyperswap_crops_go_in_and_come_back_in_minus_one_to_one() -> None:
    runner = models("hyperswap_1b_256", lambda inputs: {"output": np.full_like(inputs["target"], -1.0)})
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["hyperswap_1b_256"])
    targets = crops(2, 256, seed=3)
    swapped = asyncio.run(swapper.swap(targets, SourceIdentity(crop=crops(1, 112)[0], embedding=EMBEDDING)))
    ((_, sent),) = runner.calls
    np.testing.assert_allclose(sent["target"][0, 2], targets[0, :, :, 2] / 127.5 - 1.0, atol=1e-2)
    assert int(swapped.crops.max()) == 0


def test_a_nan_answer_is_run_again_on_the_fp32_twin_and_counted() -> None:
    def nan(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": np.full(inputs["target"].shape, np.nan, np.float32)}

    runner = models("inswapper_128", nan, twin=echo)
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["inswapper_128"])
    targets = crops(2, 128, seed=4)
    swapped = asyncio.run(swapper.swap(targets, SourceIdentity(crop=crops(1, 112)[0], embedding=EMBEDDING)))
    assert [model for model, _ in runner.calls] == ["inswapper_128", "inswapper_128_fp32"]
    assert swapped.fp32_fallbacks == 1
    assert int(np.abs(swapped.crops.astype(int) - targets.astype(int)).max()) <= 1


def test_nan_from_the_fp32_twin_too_fails_naming_it() -> None:
    def nan(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": np.full(inputs["target"].shape, np.inf, np.float32)}

    runner = models("inswapper_128", nan, twin=nan)
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["inswapper_128"])
    identity = SourceIdentity(crop=crops(1, 112)[0], embedding=EMBEDDING)
    with pytest.raises(FailedPrecondition, match="inswapper_128_fp32 returned NaN or infinite values"):
        asyncio.run(swapper.swap(crops(1, 128), identity))


def test_a_swapper_that_is_not_installed_fails_the_source_naming_the_model() -> None:
    runner = models("inswapper_128", echo)
    del runner.answers["inswapper_128_source"]
    swapper = EmbeddingSwapper(runner, runner, EMBEDDING_SWAPPERS["inswapper_128"])
    with pytest.raises(FailedPrecondition, match="inswapper_128_source"):
        asyncio.run(swapper.prepare_source(crops(1, 112)[0]))


def test_the_box_mask_fades_from_one_at_the_centre_to_nearly_zero_at_the_border() -> None:
    mask = box_mask(128)
    assert mask.shape == (128, 128) and mask.dtype == np.float32
    assert float(mask[64, 64]) == pytest.approx(1.0, abs=1e-3)
    assert float(mask[0].max()) < 0.1 and float(mask[:, 0].max()) < 0.1
    assert float(mask[0, 64]) < float(mask[9, 64]) < float(mask[20, 64])

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

from services.common.errors import NotFound, ResourceExhausted
from services.residency import model_residency
from services.residency.model_residency import (
    EnsureOutcome,
    ModelFootprint,
    ModelResidency,
    estimated_bytes,
    plan_unloads,
)
from tests.residency.fakes import READY, FakeRepository, ManualClock, SimulatedMemory, write_model_files

A, B, C = (ModelFootprint(name, 100, True) for name in "abc")
BUDGET = 250


def test_nothing_is_unloaded_while_the_request_fits() -> None:
    assert plan_unloads([A], [B], BUDGET, (), ()) == ()


def test_the_least_recently_used_model_is_unloaded_first() -> None:
    assert plan_unloads([A, B], [C], BUDGET, (), ()) == ("a",)


def test_as_many_are_unloaded_as_the_request_needs_in_order_of_use() -> None:
    assert plan_unloads([A, B, C], [ModelFootprint("d", 200, True)], 300, (), ()) == ("a", "b")


def test_a_pinned_model_is_never_unloaded() -> None:
    assert plan_unloads([A, B], [C], BUDGET, {"a"}, ()) == ("b",)


def test_a_resident_model_the_request_names_is_kept() -> None:
    assert plan_unloads([A, B], [A, C], BUDGET, (), ()) == ("b",)


def test_a_model_a_running_job_uses_is_skipped() -> None:
    assert plan_unloads([A, B], [C], BUDGET, (), {"a"}) == ("b",)


def test_room_only_running_jobs_hold_is_refused_for_now() -> None:
    with pytest.raises(ResourceExhausted, match="only unloading a, b, which running jobs use"):
        plan_unloads([A, B], [C], BUDGET, (), {"a", "b"})


def test_a_request_over_the_budget_is_refused_naming_its_models_and_bytes() -> None:
    requested = [ModelFootprint("inswapper_128", 200, True), ModelFootprint("arcface_w600k_r50", 150, False)]
    with pytest.raises(ResourceExhausted) as refused:
        plan_unloads([A], requested, 300, (), ())
    assert refused.value.message == (
        "the job's models inswapper_128 (200 bytes), arcface_w600k_r50 (150 bytes, estimated) need 350 bytes of "
        "GPU memory together; this Triton server's budget is 300 bytes, of which its pinned models hold 0"
    )


def test_pinned_models_count_against_a_request() -> None:
    with pytest.raises(ResourceExhausted, match="budget is 250 bytes, of which its pinned models hold 100"):
        plan_unloads([A], [ModelFootprint("d", 200, True)], BUDGET, {"a"}, ())


def test_the_estimate_is_the_size_of_the_model_files(tmp_path: Path) -> None:
    assert estimated_bytes(write_model_files(tmp_path, "m", 1234)) == 1234 + len('name: "m"\n')


def test_the_estimate_follows_links_to_weights(tmp_path: Path) -> None:
    weights = tmp_path / "weights.onnx"
    weights.write_bytes(b"\0" * 500)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").symlink_to(weights)
    assert estimated_bytes(tmp_path / "m") == 500


def residency_over(
    tmp_path: Path,
    sizes: Mapping[str, int],
    *,
    file_bytes: int = 100,
    pinned: Collection[str] = (),
    busy_seconds: float = 0.0,
    clock: ManualClock | None = None,
    with_gpu: bool = True,
    repository: FakeRepository | None = None,
) -> tuple[ModelResidency, FakeRepository]:
    """A residency under BUDGET over models holding `sizes` bytes on the GPU and `file_bytes` of weights on disk."""
    repository = repository or FakeRepository(sizes)
    for name in sizes:
        write_model_files(tmp_path, name, file_bytes)
    memory = SimulatedMemory(repository) if with_gpu else None
    residency = ModelResidency(repository, tmp_path, memory, BUDGET, pinned, busy_seconds, clock or ManualClock())
    return residency, repository


def ensure_each(residency: ModelResidency, *requests: list[str]) -> list[EnsureOutcome]:
    async def run() -> list[EnsureOutcome]:
        return [await residency.ensure_loaded(request) for request in requests]

    return asyncio.run(run())


def test_a_load_is_measured_as_the_change_of_used_memory(tmp_path: Path) -> None:
    residency, _ = residency_over(tmp_path, {"m": 120}, file_bytes=10)
    ensure_each(residency, ["m"])
    assert residency.residency().models[0].footprint == ModelFootprint("m", 120, True)


def test_asking_for_a_third_model_unloads_the_least_recently_used(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"a": 100, "b": 100, "c": 100})
    outcomes = ensure_each(residency, ["a"], ["b"], ["a"], ["c"])
    assert outcomes[-1] == EnsureOutcome(("c",), ("b",))
    assert repository.ready() == {"a", "c"}
    assert [model.footprint.name for model in residency.residency().models] == ["c", "a"]


def test_a_model_larger_than_its_estimate_makes_room_once_its_load_measured_it(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"a": 100, "b": 100, "c": 100}, file_bytes=10)
    outcomes = ensure_each(residency, ["a"], ["b"], ["c"])
    assert outcomes[-1] == EnsureOutcome(("c",), ("a",))
    assert repository.calls[-2:] == [("load", "c"), ("unload", "a")]


def test_pinned_models_are_loaded_at_start_and_never_unloaded(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"p": 100, "a": 100, "b": 100}, pinned={"p"})
    asyncio.run(residency.start())
    assert repository.ready() == {"p"}
    outcomes = ensure_each(residency, ["a"], ["b"])
    assert outcomes[-1].unloaded == ("a",)
    assert repository.ready() == {"p", "b"}


def test_a_refused_request_loads_nothing(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"a": 100, "x": 200, "y": 200}, file_bytes=200)
    ensure_each(residency, ["a"])
    with pytest.raises(ResourceExhausted, match=r"x \(2\d\d bytes, estimated\), y \(2\d\d bytes, estimated\)"):
        ensure_each(residency, ["x", "y"])
    assert repository.ready() == {"a"}


def test_a_request_refused_on_what_its_load_measured_is_unloaded_again(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"big": 300}, file_bytes=10)
    with pytest.raises(ResourceExhausted, match=r"big \(300 bytes\)"):
        ensure_each(residency, ["big"])
    assert repository.ready() == set()


def test_a_model_a_running_job_used_moments_ago_stays_until_it_is_idle(tmp_path: Path) -> None:
    clock = ManualClock()
    residency, repository = residency_over(tmp_path, {"a": 100, "b": 100, "c": 100}, busy_seconds=30, clock=clock)
    ensure_each(residency, ["a"], ["b"])
    clock.now += 10
    with pytest.raises(ResourceExhausted, match="only unloading a, b"):
        ensure_each(residency, ["c"])
    assert repository.ready() == {"a", "b"}
    clock.now += 25
    assert ensure_each(residency, ["c"])[0].unloaded == ("a",)


def test_a_model_the_repository_lacks_is_not_found(tmp_path: Path) -> None:
    residency, _ = residency_over(tmp_path, {"a": 100})
    with pytest.raises(NotFound, match="models nope are not in the model repository"):
        ensure_each(residency, ["a", "nope"])


def test_a_restarted_triton_gets_its_models_loaded_again(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"p": 100, "a": 100}, pinned={"p"})
    asyncio.run(residency.start())
    ensure_each(residency, ["a"])
    repository.state = dict.fromkeys(repository.state, "")
    assert ensure_each(residency, ["a"])[0].loaded == ("a",)
    assert repository.ready() == {"p", "a"}


def test_without_a_gpu_nothing_is_unloaded(tmp_path: Path) -> None:
    residency, repository = residency_over(tmp_path, {"a": 100, "b": 100, "c": 100}, with_gpu=False)
    ensure_each(residency, ["a"], ["b"], ["c"])
    assert (repository.ready(), residency.budget_bytes) == ({"a", "b", "c"}, None)


class YieldingRepository(FakeRepository):
    """Gives other requests the loop inside every load and unload, as a real server call does."""

    async def load(self, name: str) -> None:
        await asyncio.sleep(0)
        await super().load(name)

    async def unload(self, name: str) -> None:
        await asyncio.sleep(0)
        await super().unload(name)


def test_concurrent_requests_plan_one_after_the_other(tmp_path: Path) -> None:
    sizes = {"a": 100, "b": 100, "c": 100, "d": 100}
    residency, repository = residency_over(tmp_path, sizes, repository=YieldingRepository(sizes))
    ensure_each(residency, ["a"], ["b"])

    async def both() -> None:
        await asyncio.gather(residency.ensure_loaded(["c"]), residency.ensure_loaded(["d"]))

    asyncio.run(both())
    assert repository.ready() == {"c", "d"}


def test_a_model_never_measured_has_its_folder_walked_once_until_the_folder_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    residency, repository = residency_over(tmp_path, {"started": 50, "a": 50, "b": 50, "c": 50}, file_bytes=10)
    # Loaded when Triton started (--load-model): its load was never measured, so every plan estimates it.
    repository.state["started"] = READY
    walked: list[str] = []

    def counting(model_dir: Path) -> int:
        walked.append(model_dir.name)
        return estimated_bytes(model_dir)

    monkeypatch.setattr(model_residency, "estimated_bytes", counting)
    ensure_each(residency, ["a"], ["b"], ["a"])
    assert walked.count("started") == 1
    (tmp_path / "started" / "2").mkdir()
    ensure_each(residency, ["c"])
    assert walked.count("started") == 2
    assert repository.ready() == {"started", "a", "b", "c"}

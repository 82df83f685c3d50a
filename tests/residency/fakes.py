"""A model repository and a GPU that live in memory: each loaded model holds a known number of bytes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

READY = "READY"
# What the GPU holds with no model loaded (the runtime's context): loads are measured as changes above it.
BASELINE_BYTES = 7_000


class FakeRepository:
    """Triton's repository API in explicit mode: every model starts unloaded; calls are recorded in order."""

    def __init__(self, models: Mapping[str, int]) -> None:
        self.sizes = dict(models)
        self.state = {name: "" for name in models}
        self.calls: list[tuple[str, str]] = []

    async def states(self) -> Mapping[str, str]:
        return dict(self.state)

    async def load(self, name: str) -> None:
        self.calls.append(("load", name))
        self.state[name] = READY

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.state[name] = "UNAVAILABLE"

    def ready(self) -> set[str]:
        return {name for name, state in self.state.items() if state == READY}


class SimulatedMemory:
    """The GPU's used bytes: the baseline plus the size of every model the repository has loaded."""

    def __init__(self, repository: FakeRepository) -> None:
        self.repository = repository

    def used_bytes(self) -> int:
        return BASELINE_BYTES + sum(self.repository.sizes[name] for name in self.repository.ready())


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_model_files(root: Path, name: str, weight_bytes: int) -> Path:
    """`root/<name>/1/model.onnx` of `weight_bytes` bytes and a config: what an estimate reads."""
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"\0" * weight_bytes)
    (root / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    return root / name

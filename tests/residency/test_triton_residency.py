"""Residency against the real tritonserver in explicit model-control mode, serving three copies of the tiny
MTCNN P-Net, with a simulated GPU on which each loaded model holds a known number of bytes."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc

from services.residency.model_residency import EnsureOutcome, ModelResidency
from services.residency.triton_repository import TritonModelRepository
from services.triton.embedded_repository import TritonDevice, write_embedded_repository
from services.triton.server_process import EmbeddedTriton

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
COPIED_MODEL = "mtcnn_pnet"
MODELS = ("pnet_a", "pnet_b", "pnet_c")
# Each model holds 1 MB of the simulated GPU; the budget fits two. The copies' files (about 30 kB) are
# what the first plan estimates, so the third load is found too large only once it is measured.
MODEL_BYTES = 1_000_000
BUDGET_BYTES = 2_500_000


class ExplicitControlTriton(EmbeddedTriton):
    """tritonserver that loads nothing at start: every load and unload is asked for."""

    def command(self, backends: Path, repository: Path) -> list[str]:
        return [*super().command(backends, repository), "--model-control-mode=explicit"]


def copies_of_pnet(root: Path) -> Path:
    """A production repository holding MODELS, each a copy of mtcnn_pnet under its own name."""
    for name in MODELS:
        shutil.copytree(PRODUCTION_REPOSITORY / COPIED_MODEL, root / name)
        config = root / name / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{COPIED_MODEL}"', f'name: "{name}"'))
    return root


class TritonGpu:
    """Used GPU memory as Triton's own index implies it: MODEL_BYTES per READY model."""

    def __init__(self, url: str) -> None:
        self.url = url

    def ready_models(self) -> set[str]:
        with triton_grpc.InferenceServerClient(self.url) as client:
            index = client.get_model_repository_index(as_json=True)
        return {entry["name"] for entry in index.get("models", []) if entry.get("state") == "READY"}

    def used_bytes(self) -> int:
        return MODEL_BYTES * len(self.ready_models())


@pytest.fixture(scope="module")
def explicit_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    production = copies_of_pnet(tmp_path_factory.mktemp("production"))

    def write_twins(out: Path, device: TritonDevice) -> list[str]:
        write_embedded_repository(production, out, MODELS, intra_op_threads=1, device=device)
        return []  # nothing is loaded at start, so nothing to wait for

    work_dir = tmp_path_factory.mktemp("triton")
    with ExplicitControlTriton(
        production, work_dir, startup_timeout=90, device="cpu", repository_writer=write_twins
    ) as triton:
        yield triton


def test_the_least_recently_used_model_is_unloaded_from_triton(explicit_triton: EmbeddedTriton) -> None:
    gpu = TritonGpu(explicit_triton.grpc_url)

    async def run() -> list[tuple[EnsureOutcome, set[str]]]:
        repository = TritonModelRepository(explicit_triton.grpc_url, timeout_seconds=60)
        try:
            served = explicit_triton.work_dir / "model_repository"
            residency = ModelResidency(repository, served, gpu, BUDGET_BYTES, pinned=(), busy_seconds=0)
            steps = []
            for name in ("pnet_a", "pnet_b", "pnet_a", "pnet_c", "pnet_b"):
                steps.append((await residency.ensure_loaded([name]), gpu.ready_models()))
            return steps
        finally:
            await repository.close()

    steps = asyncio.run(run())
    # pnet_c's load measures it: pnet_b, used before pnet_a's second use, goes.
    assert steps[3] == (EnsureOutcome(("pnet_c",), ("pnet_b",)), {"pnet_a", "pnet_c"})
    # pnet_b is known now: room is made before its load, and pnet_a is the least recently used.
    assert steps[4] == (EnsureOutcome(("pnet_b",), ("pnet_a",)), {"pnet_c", "pnet_b"})

"""A job with an imported embedding swapper, end to end: `swapline models import` on stand-ins with
FaceFusion's file names into a copy of the repository, then the embedded stack serving it.

The stand-ins have random weights, so only the contract is judged: every frame comes back, faces are
found and swapped through ArcFace, the swapper's source conversion and the swapper, and a job naming a
swapper that is not installed fails with a reason naming the missing model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc

from services.cli import sample_media
from services.cli.__main__ import main as swapline
from services.cli.embedded_stack import EmbeddedStack, StackOptions
from services.cli.job_client import JobClient
from services.common.media_probe import probe_media
from services.triton.model_config import repository_models
from swapline.jobs.v1 import jobs_pb2
from tests.e2e.job_helpers import run_to_end
from tests.model_build.standin_face_models import write_standin

REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"


@pytest.fixture(scope="module")
def imported_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("imported")
    repository = work / "triton_models"
    shutil.copytree(REPOSITORY, repository)
    folder = work / "facefusion-models"
    folder.mkdir()
    for stem in ("inswapper_128", "arcface_w600k_r50"):
        write_standin(stem, folder)
    assert swapline(["models", "import", str(folder), "--set", "facefusion", "--repository", str(repository)]) == 0
    assert {"inswapper_128", "inswapper_128_source", "arcface_w600k_r50"} <= set(repository_models(repository))
    return repository


@pytest.fixture(scope="module")
def imported_stack(imported_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    work_dir = tmp_path_factory.mktemp("imported-stack")
    options = StackOptions(
        work_dir=work_dir, media_root=work_dir / "media", model_repository=imported_repository, workers=1
    )
    with EmbeddedStack(options) as stack:
        yield stack


@pytest.fixture(scope="module")
def imported_client(imported_stack: EmbeddedStack) -> Iterator[JobClient]:
    with imported_stack.job_client() as client:
        yield client


def loaded(stack: EmbeddedStack, model: str) -> bool:
    assert stack.triton is not None
    client = triton_grpc.InferenceServerClient(stack.triton.grpc_url)
    try:
        return bool(client.is_model_ready(model))
    finally:
        client.close()


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imported-media")
    return sample_media.make_face_video(
        folder / "astronaut-1s.mp4", sample_media.astronaut_photo(), seconds=1.0, size=(640, 360)
    )


def test_a_job_with_the_imported_inswapper_swaps_every_frame(
    imported_stack: EmbeddedStack, imported_client: JobClient, short_clip: Path, hopper_png: bytes, tmp_path: Path
) -> None:
    # Triton runs in explicit model-control mode: imported models load when a job names them.
    assert loaded(imported_stack, "face_swapper") and not loaded(imported_stack, "inswapper_128")
    job = run_to_end(imported_client, source=hopper_png, target=short_clip, swapper="inswapper_128")
    assert all(
        loaded(imported_stack, model) for model in ("inswapper_128", "inswapper_128_source", "arcface_w600k_r50")
    )
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert (job.swapper, job.detector) == ("inswapper_128", "mtcnn")
    output = imported_client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, tmp_path / "output.mp4")
    report = json.loads(imported_client.fetch(job.id, jobs_pb2.ARTIFACT_REPORT, tmp_path / "report.json").read_text())
    assert probe_media(output).frame_count == probe_media(short_clip).frame_count
    assert report["swapper"] == "inswapper_128"
    assert report["faces"] >= report["frames"] > 0


def test_a_job_naming_a_swapper_that_is_not_installed_fails_naming_it(
    imported_client: JobClient, short_clip: Path, hopper_png: bytes
) -> None:
    job = run_to_end(imported_client, source=hopper_png, target=short_clip, swapper="hyperswap_1a_256")
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert "hyperswap_1a_256" in job.error.message

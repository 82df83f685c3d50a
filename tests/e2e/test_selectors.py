"""A frame with two people: `many` swaps each face, `reference` only the matching one."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.cli import sample_media
from services.cli.job_client import JobClient
from swapline.jobs.v1 import jobs_pb2
from tests.e2e.job_helpers import run_to_end
from tests.support.identity_judge import IdentityJudge

Halves = tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def two_people(media: Path) -> Path:
    path = media / "two-people.png"
    sample_media.make_two_person_image(path)
    return path


@pytest.fixture(scope="module")
def judge() -> IdentityJudge:
    return IdentityJudge()


def swapped_halves(client: JobClient, target: Path, tmp_path: Path, **options: object) -> tuple[Halves, dict]:
    job = run_to_end(client, target=target, **options)  # type: ignore[arg-type]
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    output = client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, tmp_path / f"{job.id}.png")
    image = cv2.cvtColor(cv2.imread(str(output)), cv2.COLOR_BGR2RGB)
    middle = image.shape[1] // 2
    return (image[:, :middle], image[:, middle:]), json.loads(job.report_json)


def original_halves(target: Path) -> Halves:
    image = cv2.cvtColor(cv2.imread(str(target)), cv2.COLOR_BGR2RGB)
    middle = image.shape[1] // 2
    return image[:, :middle], image[:, middle:]


def is_person(judge: IdentityJudge, half: np.ndarray, photo: np.ndarray) -> bool:
    found, known = judge.descriptor(half), judge.descriptor(photo)
    assert found is not None and known is not None
    return judge.distance(found, known) < 0.5


def test_many_swaps_every_face(
    client: JobClient,
    two_people: Path,
    judge: IdentityJudge,
    hopper_png: bytes,
    astronaut_png: bytes,
    tmp_path: Path,
) -> None:
    astronaut, hopper = sample_media.astronaut_photo(), sample_media.grace_hopper_photo()
    (left, right), report = swapped_halves(client, two_people, tmp_path, source=hopper_png, selector="many")
    assert report["faces"] == 2
    assert is_person(judge, left, hopper) and not is_person(judge, left, astronaut)
    (left, right), report = swapped_halves(client, two_people, tmp_path, source=astronaut_png, selector="many")
    assert report["faces"] == 2
    assert is_person(judge, right, astronaut) and not is_person(judge, right, hopper)


@pytest.mark.parametrize("reference_side", ["left", "right"])
def test_reference_swaps_only_the_matching_face(
    client: JobClient,
    two_people: Path,
    judge: IdentityJudge,
    hopper_png: bytes,
    astronaut_png: bytes,
    tmp_path: Path,
    reference_side: str,
) -> None:
    astronaut, hopper = sample_media.astronaut_photo(), sample_media.grace_hopper_photo()
    reference, source, replaced_person = (
        (astronaut_png, hopper_png, hopper) if reference_side == "left" else (hopper_png, astronaut_png, astronaut)
    )
    (left, right), report = swapped_halves(
        client, two_people, tmp_path, source=source, selector="reference", reference=reference
    )
    original_left, original_right = original_halves(two_people)
    assert report["faces"] == 1
    changed, untouched, untouched_original = (
        (left, right, original_right) if reference_side == "left" else (right, left, original_left)
    )
    assert is_person(judge, changed, replaced_person)
    assert np.array_equal(untouched, untouched_original)

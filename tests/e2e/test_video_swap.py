"""The main job through the gateway's gRPC API: identity judged independently, format kept."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

from services.cli import sample_media
from services.cli.job_client import JobClient
from services.common.media_probe import probe_media
from swapline.jobs.v1 import jobs_pb2
from tests.e2e.job_helpers import run_to_end
from tests.support.identity_judge import IdentityJudge


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_video_swap_carries_source_identity_and_keeps_format(
    client: JobClient, astronaut_video: Path, hopper_png: bytes, tmp_path: Path
) -> None:
    job = run_to_end(client, source=hopper_png, target=astronaut_video, selector="one")
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    output = client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, tmp_path / "output.mp4")
    report = json.loads(client.fetch(job.id, jobs_pb2.ARTIFACT_REPORT, tmp_path / "report.json").read_text())

    source_info, output_info = probe_media(astronaut_video), probe_media(output)
    assert abs(output_info.frame_count - source_info.frame_count) <= 1
    assert abs(output_info.fps - source_info.fps) < 1e-6
    assert (output_info.width, output_info.height) == (source_info.width, source_info.height)
    assert output_info.has_audio and source_info.has_audio
    assert report["chunks"] > 1
    assert report["frames"] == source_info.frame_count
    recommendation = report["recommendation"]
    assert recommendation["recommended_gpu"] and recommendation["reason"]
    chosen = [option for option in recommendation["options"] if option["gpu"] == recommendation["recommended_gpu"]]
    assert len(chosen) == 1 and chosen[0]["fits"]
    assert "ran in CPU mode" in " ".join(report["warnings"])

    judge = IdentityJudge()
    source_identity = judge.descriptor(sample_media.grace_hopper_photo())
    original_identity = judge.descriptor(sample_media.astronaut_photo())
    assert source_identity is not None and original_identity is not None
    passed = 0
    frames = decoded_frames(output)
    distances: list[tuple[float, float] | None] = []
    for frame in frames:
        found = judge.descriptor(frame)
        if found is None:
            distances.append(None)
            continue
        to_source, to_original = judge.distance(found, source_identity), judge.distance(found, original_identity)
        distances.append((round(to_source, 3), round(to_original, 3)))
        if to_source < 0.5 and to_original - to_source >= 0.15:
            passed += 1
    assert len(frames) >= 125
    assert passed / len(frames) >= 0.95, f"{passed}/{len(frames)} frames pass; distances {distances}"

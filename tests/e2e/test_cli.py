"""`swapline run` as a user runs it, against the running stack: a video and an image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2

from services.cli import sample_media
from services.cli.embedded_stack import REPOSITORY_ROOT, EmbeddedStack


def swapline(stack: EmbeddedStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWAPLINE_GATEWAY": stack.gateway_address}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_run_writes_output_and_report_for_an_image(stack: EmbeddedStack, tmp_path: Path) -> None:
    target, source = tmp_path / "photo.jpg", tmp_path / "source.png"
    cv2.imwrite(str(target), cv2.cvtColor(sample_media.astronaut_photo(), cv2.COLOR_RGB2BGR))
    source.write_bytes(sample_media.encode_png(sample_media.grace_hopper_photo()))
    result = swapline(
        stack,
        "run",
        "--source",
        str(source),
        "--target",
        str(target),
        "--output",
        str(tmp_path / "out.jpg"),
        "--report",
        str(tmp_path / "report"),
    )
    assert result.returncode == 0, result.stderr
    image = cv2.imread(str(tmp_path / "out.jpg"))
    assert image is not None and image.shape[:2] == (512, 512)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["frames"] == 1 and report["faces"] == 1


def test_submit_watch_get_list(stack: EmbeddedStack, tmp_path: Path) -> None:
    target, source = tmp_path / "photo.png", tmp_path / "source.png"
    target.write_bytes(sample_media.encode_png(sample_media.astronaut_photo()))
    source.write_bytes(sample_media.encode_png(sample_media.grace_hopper_photo()))
    submitted = swapline(stack, "submit", "--source", str(source), "--target", str(target))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = swapline(stack, "watch", job_id)
    assert watched.returncode == 0, watched.stderr
    assert "100.0%" in watched.stderr
    got = json.loads(swapline(stack, "get", job_id).stdout)
    assert got["state"] == "JOB_STATE_SUCCEEDED"
    assert job_id in swapline(stack, "list").stdout
    missing = swapline(stack, "get", "no-such-job")
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr

"""The service image's Dockerfile and `make images`, checked without a container engine (none runs here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.deploy.chart_render import DOCKERFILE, REPO_ROOT, scenario_objects, workload_of

DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(pending.strip())
            pending = ""
    return [(text.split(" ", 1)[0].upper(), text.split(" ", 1)[1]) for text in joined]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(index for index, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


def test_the_runtime_stage_is_python_slim_and_runs_python_m() -> None:
    steps = final_stage()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for name, value in instructions() if name == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert steps[0] == ("FROM", "${PYTHON_IMAGE}")
    (entrypoint,) = [value for name, value in steps if name == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m"]


def test_the_image_user_is_the_charts_non_root_user() -> None:
    (user,) = [value for name, value in final_stage() if name == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0
    for service in ("gateway", "worker", "decoder", "detector", "encoder", "advisor"):
        pod = workload_of(scenario_objects("default"), service)["spec"]["template"]["spec"]
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)


def test_models_and_build_outputs_stay_out_of_the_image() -> None:
    copied = " ".join(value for name, value in instructions() if name in ("COPY", "ADD"))
    assert "triton_models" not in copied and "build" not in copied.split()
    patterns = DOCKERIGNORE.read_text().splitlines()
    assert patterns[patterns.index("*") :][:1] == ["*"]
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert allowed == {"constraints.txt", "pyproject.toml", "README.md", "protos", "services"}
    # What the build copies is what the context lets in.
    sources = {
        source
        for name, value in instructions()
        if name == "COPY" and "--from" not in value
        for source in value.split()[:-1]
    }
    assert {source.rstrip("/") for source in sources} == allowed


def test_the_runtime_stage_installs_no_build_tools() -> None:
    runs = " ".join(value for name, value in final_stage() if name == "RUN")
    assert "pip install" not in runs and "apt-get" not in runs
    assert "grpcio-tools" not in runs


def make_images(path_dir: Path) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    assert make is not None
    return subprocess.run(
        [make, "--no-print-directory", "-C", str(REPO_ROOT), "images"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(path_dir)},
        check=False,
    )


def tool_dir(tmp_path: Path) -> Path:
    """A PATH with the shell tools the Makefile uses and no container engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "sed", "find", "dirname"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    return bin_dir


def test_make_images_says_when_no_engine_is_available(tmp_path: Path) -> None:
    result = make_images(tool_dir(tmp_path))
    assert result.returncode != 0
    assert "no container engine available" in result.stderr
    assert "docker or podman" in result.stderr


def test_make_images_skips_an_engine_that_does_not_answer(tmp_path: Path) -> None:
    bin_dir = tool_dir(tmp_path)
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    result = make_images(bin_dir)
    assert result.returncode != 0
    assert "no container engine available" in result.stderr


def test_make_images_builds_with_podman_when_docker_is_absent(tmp_path: Path) -> None:
    bin_dir = tool_dir(tmp_path)
    calls = tmp_path / "calls"
    (bin_dir / "podman").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "podman").chmod(0o755)
    result = make_images(bin_dir)
    assert result.returncode == 0, result.stderr
    version = next(
        line.split('"')[1]
        for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines()
        if line.startswith("version = ")
    )
    build = f"build -f deploy/docker/Dockerfile -t swapline:{version} ."
    assert calls.read_text().splitlines() == ["info", build]

"""The image's install steps, the wheel they build and the services it starts, run for real.

There is no container engine here, so the build stage of deploy/docker/Dockerfile is carried out as
written: ENV sets the environment, WORKDIR and COPY lay the build context out under a temporary folder
that stands for the container's root, and every RUN runs with /bin/sh, on a clean virtual environment
that stands for the base image's Python. pip reads packages from a wheelhouse repacked from this test
environment (wheelhouse.py) instead of PyPI, so the steps run offline. The virtual environment they
build is the one the runtime stage copies whole: it must hold the wheel with its generated protobuf
package and the core dependencies only, and start every service of the image far enough to load its
settings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import venv
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.chart_render import PYTHON_SERVICES
from tests.deploy.test_images import final_stage, instructions
from tests.packaging.wheelhouse import (
    REPO_ROOT,
    build_requirements,
    installed_closure,
    pinned_versions,
    prepared_wheelhouse,
    project_requirements,
)

BUILD_STAGE = "build"
# Beside the wheel and its dependencies, the image's virtual environment holds these, pinned too.
INSTALLERS = (Requirement("pip"), Requirement("setuptools"))
# Every `python -m services.<name>` the chart runs on the image (the residency sidecar beside Triton too).
IMAGE_SERVICES = (*PYTHON_SERVICES, "residency")
# Entry points the image does not run: the CLI and the embedded Triton (extra "embedded"), the model
# build (extra "build") and the benchmark.
OTHER_ENTRY_POINTS = frozenset({"cli", "triton", "model_build", "bench"})
# Only extras bring these; the image has none of them.
EXTRAS_ONLY = ("nvidia-pytriton", "onnxruntime", "onnx", "torch", "grpcio-tools", "scikit-image", "pytest")
# What a service must be given (settings without a default), by service.
REQUIRED_SETTINGS: Mapping[str, Mapping[str, str]] = {
    "advisor": {"GATEWAY_TARGET": "gateway:50052"},
    "decoder": {"MEDIA_ROOT": "/media"},
    "encoder": {"MEDIA_ROOT": "/media"},
    "gateway": {
        "MEDIA_ROOT": "/media",
        "DECODER_TARGET": "decoder:50061",
        "DETECTOR_TARGET": "detector:50062",
        "ENCODER_TARGET": "encoder:50063",
    },
    "worker": {
        "GATEWAY_TARGET": "gateway:50052",
        "DECODER_TARGET": "decoder:50061",
        "DETECTOR_TARGET": "detector:50062",
        "ENCODER_TARGET": "encoder:50063",
        "TRITON_URL": "triton:8001",
    },
}
# What .dockerignore keeps out of the folders it lets into the build context.
IGNORED_IN_CONTEXT = shutil.ignore_patterns("__pycache__", "*.pyc")
# A path written into a RUN step: it would reach the machine running the test, not a temporary folder.
ABSOLUTE_PATH = re.compile(r"(?<![\w$}.])/[A-Za-z]")
# A process environment with nothing of this test's (no PYTHONPATH, no VIRTUAL_ENV).
CLEAN_ENVIRONMENT = {"PATH": "/usr/bin:/bin"}


@dataclass(frozen=True)
class ImageBuild:
    """What the build stage left: its virtual environment and its working directory."""

    venv: Path
    workdir: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def build_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = next(
        index for index, (name, value) in enumerate(steps) if name == "FROM" and value.endswith(f" AS {BUILD_STAGE}")
    )
    end = next(index for index in range(start + 1, len(steps)) if steps[index][0] == "FROM")
    return steps[start + 1 : end]


def environment_of(step_value: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(step_value))


def in_container(root: Path, path: str) -> Path:
    """Where the container's absolute `path` lies under `root`."""
    return root / path.lstrip("/")


def copy_into(sources: list[str], destination: Path) -> None:
    """Docker's COPY from the repository: files into a folder, a folder's contents into the destination."""
    for source in sources:
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, destination, ignore=IGNORED_IN_CONTEXT, dirs_exist_ok=True)
        else:
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, destination / origin.name)


def base_python(folder: Path) -> Path:
    """A clean virtual environment standing for the base image's Python. Without pip: the steps use only
    the pip of the environment they make."""
    venv.EnvBuilder(with_pip=False).create(folder)
    return folder / "bin"


def offline_from(wheelhouse: Path) -> dict[str, str]:
    """pip settings that make `wheelhouse` stand for PyPI. pip leaves bytecode out: writing it is most of
    an install's time, and nothing here depends on it."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_COMPILE": "false"}


def run_build_stage(root: Path, package_source: Mapping[str, str]) -> ImageBuild:
    """Carries out the build stage under `root`, pip reading packages where `package_source` says; the
    machine's own pip configuration stays out."""
    environment = {
        "PATH": f"{base_python(root / 'base-python')}{os.pathsep}{CLEAN_ENVIRONMENT['PATH']}",
        "HOME": str(root / "home"),
        "PIP_CONFIG_FILE": os.devnull,
        **package_source,
    }
    workdir = root
    for name, value in build_stage():
        if name == "ENV":
            for key, setting in environment_of(value).items():
                environment[key] = str(in_container(root, setting)) if setting.startswith("/") else setting
        elif name == "WORKDIR":
            workdir = in_container(root, value)
            workdir.mkdir(parents=True, exist_ok=True)
        elif name == "COPY":
            *sources, destination = value.split()
            copy_into(sources, workdir / destination)
        elif name == "RUN":
            assert not ABSOLUTE_PATH.search(value), f"a RUN step names an absolute path: {value}"
            result = subprocess.run(
                ["/bin/sh", "-c", value], cwd=workdir, env=environment, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, f"RUN {value}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        else:
            raise AssertionError(f"the build stage has a {name} step this test does not carry out")
    return ImageBuild(venv=Path(environment["VIRTUAL_ENV"]), workdir=workdir)


@pytest.fixture(scope="module")
def image_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageBuild]:
    wheelhouse = prepared_wheelhouse([*project_requirements(), *build_requirements(), *INSTALLERS])
    root = tmp_path_factory.mktemp("image-root")
    yield run_build_stage(root, offline_from(wheelhouse))
    shutil.rmtree(root)


def installed_in(build: ImageBuild) -> dict[str, str]:
    """Canonical name -> version of every distribution in the image's virtual environment."""
    listing = subprocess.run(
        [str(build.python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        env={**CLEAN_ENVIRONMENT, "PIP_CONFIG_FILE": os.devnull},
    )
    return {canonicalize_name(entry["name"]): entry["version"] for entry in json.loads(listing.stdout)}


def test_constraints_pin_every_requirement_at_the_tested_version() -> None:
    pins = pinned_versions()
    needed = installed_closure([*project_requirements(["dev"]), *build_requirements(), *INSTALLERS])
    for name, distribution in needed.items():
        assert name in pins, f"{name} is installed for swapline but constraints.txt does not pin it"
        # A local label (torch's +cpu build here) is not part of the pin.
        assert Version(distribution.version).public == str(pins[name]), name


def test_the_runtime_stage_copies_the_build_stages_environment() -> None:
    (build_env,) = [environment_of(value) for name, value in build_stage() if name == "ENV"]
    venv_path = build_env["VIRTUAL_ENV"]
    copies = [value.split() for name, value in final_stage() if name == "COPY"]
    assert [f"--from={BUILD_STAGE}", venv_path, venv_path] in copies
    (runtime_env,) = [environment_of(value) for name, value in final_stage() if name == "ENV"]
    assert runtime_env["PATH"].split(":")[0] == f"{venv_path}/bin"


def test_the_image_steps_install_the_wheel_with_core_dependencies_only(image_build: ImageBuild) -> None:
    installed = installed_in(image_build)
    core = installed_closure(project_requirements())
    assert set(installed) == {*core, "swapline", "pip", "setuptools"}
    pins = pinned_versions()
    unpinned = {
        name: version for name, version in installed.items() if name != "swapline" and Version(version) != pins[name]
    }
    assert not unpinned
    assert not set(map(canonicalize_name, EXTRAS_ONLY)) & set(installed)


def test_the_wheel_carries_the_generated_protobuf_package(image_build: ImageBuild) -> None:
    (wheel,) = (image_build.workdir / "dist").glob("swapline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for proto in (REPO_ROOT / "protos").rglob("*.proto"):
        module = proto.relative_to(REPO_ROOT / "protos").with_suffix("").as_posix()
        assert {f"{module}_pb2.py", f"{module}_pb2_grpc.py", f"{module}_pb2.pyi"} <= names, module
    assert "swapline/__init__.py" in names
    assert not any(name.startswith("protos/") for name in names)


def service_environment(service: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    prefix = f"SWAPLINE_{service.upper()}_"
    settings = {f"{prefix}{key}": value for key, value in REQUIRED_SETTINGS.get(service, {}).items()}
    return {**CLEAN_ENVIRONMENT, **settings, **(extra or {})}


def test_every_image_service_starts_from_the_installed_wheel(image_build: ImageBuild, tmp_path: Path) -> None:
    entry_points = {path.parent.name for path in (REPO_ROOT / "services").glob("*/__main__.py")}
    assert entry_points == {*IMAGE_SERVICES, *OTHER_ENTRY_POINTS}
    # Outside the checkout, with nothing on PYTHONPATH: every module comes from the virtual environment.
    located = subprocess.run(
        [str(image_build.python), "-c", "import services, swapline; print(services.__file__, swapline.__file__)"],
        cwd=tmp_path,
        env=CLEAN_ENVIRONMENT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(Path(path).is_relative_to(image_build.venv) for path in located.stdout.split()), located.stdout
    starts = {
        service: subprocess.Popen(
            [str(image_build.python), "-m", f"services.{service}", "--check"],
            cwd=tmp_path,
            env=service_environment(service),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for service in IMAGE_SERVICES
    }
    invalid = subprocess.Popen(
        [str(image_build.python), "-m", "services.worker", "--check"],
        cwd=tmp_path,
        env=service_environment("worker", {"SWAPLINE_WORKER_BATCH_SIZE": "0"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for service, process in starts.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{service}:\n{output}"
        assert output.strip().endswith(f"{service}: settings are valid"), output
    output, _ = invalid.communicate(timeout=120)
    assert invalid.returncode == 1
    assert "SWAPLINE_WORKER_BATCH_SIZE=0 must be at least 1" in output

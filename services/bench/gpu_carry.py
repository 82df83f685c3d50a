"""`make bench-gpu`: prepares what the GPU benchmark needs on the GPU machine, and prints the calls to make.

The GPU machine (the device tool's `nvidia-h200`) has Python 3.12 with torch on CUDA, grpcio, protobuf,
OpenCV and NVML, but no PyAV, tritonserver, tritonclient or PyNvVideoCodec, no PyPI, and numpy 2, which
Triton's Python backend does not take (its output tensors come back empty). Those packages travel as
unpacked wheels for CPython 3.12, pruned of what the benchmark never loads and packed as tar.xz, in
groups of at most CARRY_LIMIT_BYTES: a call carries at most 64 MiB with the project beside it. The
groups go into ignored folders (`.gpu-<group>/`) that each call names in its `carry` list, with the
generated protos and the MTCNN weights wheel. The machine stays warm 30 s between calls and keeps
what was unpacked, so the calls are made back to back; each runs `services/bench/gpu_device.sh`.

This module never calls the GPU machine itself: the device tool is called by whoever runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.media_paths import temporary_path, write_file

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
CARRY_LIMIT_BYTES = 58 * 1024 * 1024  # 64 MiB a call, less the project and the protos
TARGET_PYTHON = "3.12"
# pip matches manylinux tags exactly; these cover every wheel below.
PLATFORMS = (
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


@dataclass(frozen=True)
class CarryGroup:
    """Packages unpacked into one archive, and the folder (relative to the repository) a call carries;
    programs (wheels that ship one executable, such as py-spy) go beside it in bin/, unpacked."""

    name: str
    requirements: tuple[str, ...]
    programs: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        return f".gpu-{self.name}"

    @property
    def archive(self) -> str:
        return f"{self.name}.tar.xz"


# "triton": the server, its client, and the numpy its Python backend needs; the first call runs the
# precision sweep with these alone. "media": video in and out, for the services' benchmark.
GROUPS = (
    CarryGroup(
        "triton",
        (
            "nvidia-pytriton==0.7.0",
            "tritonclient==2.73.0",
            "numpy==1.26.4",
            "grpcio==1.85.3",
            "protobuf==6.33.6",
            "grpcio-health-checking==1.81.1",
            "grpcio-reflection==1.81.1",
            "psycopg==3.3.9",
            "psycopg-binary==3.3.9",
            "python-rapidjson==1.20",
        ),
    ),
    # py-spy samples where the services' CPU goes (gpu_bench --profile-dir).
    CarryGroup("media", ("av==18.1.0", "pynvvideocodec==2.2.4"), programs=("py-spy==0.4.3",)),
)
FACENET_WHEEL = "facenet_pytorch-2.6.0-py3-none-any.whl"
# Inside the unpacked wheels: stubs and a libpython for other Python versions than the machine's,
# PyNvVideoCodec's bundled FFmpeg sources and notebooks. Nothing the benchmark loads.
PRUNED = (
    "pytriton/tritonserver/python_backend_stubs/3.8",
    "pytriton/tritonserver/python_backend_stubs/3.9",
    "pytriton/tritonserver/python_backend_stubs/3.10",
    "pytriton/tritonserver/python_backend_stubs/3.11",
    "pytriton/tritonserver/python_backend_stubs/3.13",
    "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0",
    "pynvvideocodec-2.2.4.data",
    "samples",
)


def download_command(requirements: Sequence[str], dest: Path) -> list[str]:
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        TARGET_PYTHON,
        "--implementation",
        "cp",
        *platforms,
        "--dest",
        str(dest),
        *requirements,
    ]


def link_duplicates(root: Path) -> int:
    """Replaces each file whose bytes repeat another's in the same folder by a link to it; returns how many.

    Wheels cannot hold links, so a library's .so, .so.N and .so.N.M.K arrive as three copies.
    """
    replaced = 0
    for folder, _, names in os.walk(root):
        seen: dict[tuple[int, str], str] = {}
        for name in sorted(names, key=lambda entry: (-len(entry), entry)):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            key = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            if key in seen:
                path.unlink()
                path.symlink_to(seen[key])
                replaced += 1
            else:
                seen[key] = name
    return replaced


def unpack_wheels(wheels: Iterable[Path], site: Path) -> None:
    """Unzips the wheels into one site folder, keeping the executable bits zip records, then prunes it."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                path = Path(archive.extract(member, site))
                mode = (member.external_attr >> 16) & 0o777
                if mode and not member.is_dir():
                    path.chmod(mode)
    for pruned in PRUNED:
        target = site / pruned
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    link_duplicates(site)


def pack(site: Path, archive: Path) -> int:
    """Writes site's contents as archive (xz, preset 9) through a temporary name; returns its size."""
    partial = temporary_path(archive)
    with tarfile.open(partial, "w:xz", preset=9) as tar:
        for entry in sorted(site.iterdir()):
            tar.add(entry, arcname=entry.name)
    os.replace(partial, archive)
    return archive.stat().st_size


def prepare_group(group: CarryGroup, build: Path) -> Path:
    """Downloads, unpacks, prunes and packs one group into REPOSITORY_ROOT/<folder>/ (skipping an archive
    already packed from the same requirements), and puts its programs in <folder>/bin; returns the archive."""
    folder = REPOSITORY_ROOT / group.folder
    archive = folder / group.archive
    stamp = folder / ".requirements"
    wanted = "\n".join(group.requirements)
    if not (archive.exists() and stamp.exists() and stamp.read_text() == wanted):
        pack_group(group, build, archive)
        write_file(stamp, wanted)
    install_programs(group, build, folder / "bin")
    return archive


def pack_group(group: CarryGroup, build: Path, archive: Path) -> None:
    wheels = build / "wheels" / group.name
    site = build / "site" / group.name
    for path in (wheels, site):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    subprocess.run(download_command(group.requirements, wheels), check=True)
    unpack_wheels(sorted(wheels.glob("*.whl")), site)
    archive.parent.mkdir(exist_ok=True)
    size = pack(site, archive)
    if size > CARRY_LIMIT_BYTES:
        archive.unlink()
        raise SystemExit(
            f"{group.name}: {size / 2**20:.1f} MiB packed, over the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB a call carries"
        )


def install_programs(group: CarryGroup, build: Path, bin_dir: Path) -> None:
    """Downloads each program's wheel and puts the executables it ships (its .data/scripts) into bin_dir."""
    if not group.programs:
        return
    wheels = build / "programs" / group.name
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    subprocess.run(download_command(group.programs, wheels), check=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                parts = Path(member.filename).parts
                if len(parts) == 3 and parts[0].endswith(".data") and parts[1] == "scripts":
                    write_file(bin_dir / parts[2], archive.read(member), mode=0o755)


# (stage of gpu_device.sh, the group its call carries). The first call unpacks the Triton group; the
# second, made at once while the machine is warm and still holds that group, carries the media group,
# checks the models on the GPU and runs the services' benchmark; the precision sweep needs the Triton
# group alone.
STAGES = (("unpack", "triton"), ("services", "media"), ("precision", "triton"))
# Build output every call carries: the generated protos, the MTCNN weights, and the models `make models`
# built here (ONNX, state dicts and the cascade's TorchScript), so the GPU machine serves the same files.
CARRIED_BUILD = ("swapline", "build/weights", "triton_models")


def device_calls(groups: Sequence[CarryGroup]) -> list[tuple[str, list[str]]]:
    """(command, carry) for each call, in order."""
    folders = {group.name: group.folder for group in groups}
    return [(f"bash services/bench/gpu_device.sh {stage}", [folders[group], *CARRIED_BUILD]) for stage, group in STAGES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.gpu_carry", description=__doc__)
    parser.add_argument("--build", default="build/gpu-carry", help="where wheels are downloaded and unpacked")
    args = parser.parse_args(argv)
    build = Path(args.build).resolve()
    weights = REPOSITORY_ROOT / "build" / "weights" / FACENET_WHEEL
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run `make models` first")
    for group in GROUPS:
        archive = prepare_group(group, build)
        print(f"{group.folder}/{group.archive}: {archive.stat().st_size / 2**20:.1f} MiB", flush=True)
    print("\nOn the GPU machine (device tool, kind nvidia-h200), these calls in order, each at once after the last:")
    for number, (command, carry) in enumerate(device_calls(GROUPS), start=1):
        print(f"  {number}. run(command={command!r}, carry={carry}, timeout_s=600)")
    print(
        "Figures come back as JSON under the call's files; `python -m services.bench.gpu_bench --summarise` reads them."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

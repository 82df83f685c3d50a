import stat
import tarfile
import zipfile
from pathlib import Path

from services.bench.gpu_carry import (
    CARRY_LIMIT_BYTES,
    GROUPS,
    device_calls,
    download_command,
    link_duplicates,
    pack,
    unpack_wheels,
)


def test_download_asks_for_cpython_312_wheels_without_dependencies(tmp_path: Path) -> None:
    command = download_command(["av==18.1.0"], tmp_path)
    assert command[-1] == "av==18.1.0"
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_28_x86_64" in command


def test_each_call_carries_one_group_and_the_protos() -> None:
    calls = device_calls(GROUPS)
    assert [command for command, _ in calls] == [
        "bash services/bench/gpu_device.sh unpack",
        "bash services/bench/gpu_device.sh services",
        "bash services/bench/gpu_device.sh precision",
    ]
    assert [carry[0] for _, carry in calls] == [".gpu-triton", ".gpu-media", ".gpu-triton"]
    assert all({"swapline", "triton_models"} <= set(carry) and len(carry) <= 8 for _, carry in calls)


def test_repeated_libraries_become_links(tmp_path: Path) -> None:
    (tmp_path / "libx.so.1.2.3").write_bytes(b"library")
    (tmp_path / "libx.so.1").write_bytes(b"library")
    (tmp_path / "liby.so").write_bytes(b"other")
    assert link_duplicates(tmp_path) == 1
    assert (tmp_path / "libx.so.1").is_symlink()
    assert (tmp_path / "libx.so.1").read_bytes() == b"library"
    assert not (tmp_path / "liby.so").is_symlink()


def test_wheels_unpack_with_their_executable_bits_and_pruned(tmp_path: Path) -> None:
    wheel = tmp_path / "server-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        binary = zipfile.ZipInfo("pytriton/tritonserver/bin/tritonserver")
        binary.external_attr = (stat.S_IFREG | 0o755) << 16
        archive.writestr(binary, b"\x7fELF")
        archive.writestr("pytriton/tritonserver/python_backend_stubs/3.13/stub", b"old")
        archive.writestr("pytriton/tritonserver/python_backend_stubs/3.12/stub", b"kept")
    site = tmp_path / "site"
    unpack_wheels([wheel], site)
    assert (site / "pytriton/tritonserver/bin/tritonserver").stat().st_mode & 0o111
    assert not (site / "pytriton/tritonserver/python_backend_stubs/3.13").exists()
    assert (site / "pytriton/tritonserver/python_backend_stubs/3.12/stub").read_bytes() == b"kept"
    archive_path = tmp_path / "out.tar.xz"
    assert 0 < pack(site, archive_path) < CARRY_LIMIT_BYTES
    with tarfile.open(archive_path) as packed:
        assert "pytriton/tritonserver/bin/tritonserver" in packed.getnames()

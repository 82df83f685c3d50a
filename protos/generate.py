"""Generates the `swapline` package (protobuf messages, gRPC stubs and their type stubs) from these protos.

setuptools runs it as the wheel's build_py (pyproject.toml, [tool.setuptools.cmdclass]), so every wheel
carries the code of the protos it was built from. An editable install and `make protos` write the package
into the working tree instead, where the tests and mypy import it: `python protos/generate.py <out-dir>`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from grpc_tools import protoc
from setuptools.command.build_py import build_py

PROTO_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PROTO_ROOT.parent
PACKAGE = "swapline"
# google/protobuf/*.proto (timestamp.proto and the like) ship inside grpcio-tools.
WELL_KNOWN_PROTOS = Path(protoc.__file__).with_name("_proto")


def generate(out_dir: Path) -> list[Path]:
    """Writes `<out_dir>/swapline/` afresh from every .proto here; returns the files written."""
    package_dir = out_dir / PACKAGE
    shutil.rmtree(package_dir, ignore_errors=True)
    package_dir.mkdir(parents=True)
    protos = sorted(str(path) for path in PROTO_ROOT.rglob("*.proto"))
    arguments = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={WELL_KNOWN_PROTOS}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *protos,
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc could not generate {PACKAGE} from {PROTO_ROOT}")
    for folder in (package_dir, *(path for path in package_dir.rglob("*") if path.is_dir())):
        (folder / "__init__.py").touch()
    return sorted(path for path in package_dir.rglob("*") if path.is_file())


class BuildWithProtos(build_py):
    """build_py that also writes the generated package: into the wheel's tree, or, for an editable install
    (which puts the working tree on sys.path), into the working tree."""

    def run(self) -> None:
        super().run()
        generate(PROJECT_ROOT if self.editable_mode else Path(self.build_lib))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python protos/generate.py", description=__doc__)
    parser.add_argument("out_dir", type=Path, help=f"where the {PACKAGE} package is written")
    out_dir = parser.parse_args(argv).out_dir
    print(f"generated {len(generate(out_dir))} files under {out_dir / PACKAGE}")


if __name__ == "__main__":
    main()

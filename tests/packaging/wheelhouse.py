"""The project's requirements as pyproject.toml and constraints.txt write them, and a wheelhouse repacked
from this test environment's installed distributions.

The wheelhouse lets a clean virtual environment install the swapline wheel's dependencies with
`--no-index --find-links`: offline, with no download, at the versions this environment runs. Each
wheel holds what the installed distribution's RECORD lists (bytecode and files outside site-packages
left out: pip writes console scripts again from entry_points.txt). Wheels are kept under build/ and
made only where missing, so later runs reuse them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import tomllib
import zipfile
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from services.common.media_paths import temporary_path

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = REPO_ROOT / "pyproject.toml"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
WHEELHOUSE = REPO_ROOT / "build" / "wheelhouse"
PROJECT = "swapline"
# What the metadata says about the install rather than the package.
_INSTALL_RECORDS = frozenset({"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"})


def _pyproject() -> dict[str, object]:
    with PYPROJECT.open("rb") as file:
        return tomllib.load(file)


def project_requirements(extras: Iterable[str] = ()) -> list[Requirement]:
    """The project's core requirements and those of `extras`, its own extras (`swapline[...]`) expanded."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    optional: dict[str, list[str]] = project["optional-dependencies"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    pending, seen = list(extras), set[str]()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == PROJECT:
                pending.extend(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def build_requirements() -> list[Requirement]:
    """What building the wheel installs: pyproject.toml's [build-system] requires."""
    build_system = _pyproject()["build-system"]
    assert isinstance(build_system, dict)
    return [Requirement(text) for text in build_system["requires"]]


def pinned_versions() -> dict[str, Version]:
    """constraints.txt as canonical name -> pinned version; every line pins one version."""
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"constraints.txt pins one version a line: {line!r}"
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def installed_closure(requirements: Iterable[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """Canonical name -> installed distribution, for `requirements` and everything they need in turn,
    markers evaluated for this interpreter and the extras asked for; raises where one is not installed."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(requirement, "") for requirement in requirements]
    visited: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in visited:
            continue
        visited.add(key)
        distribution = found.setdefault(name, importlib.metadata.distribution(name))
        for text in distribution.requires or []:
            for wanted_extra in ("", *sorted(requirement.extras)):
                pending.append((Requirement(text), wanted_extra))
    return found


def _tag_values(distribution: importlib.metadata.Distribution) -> list[str]:
    return [
        line.split(":", 1)[1].strip()
        for line in (distribution.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]


def repack(distribution: importlib.metadata.Distribution, folder: Path) -> Path:
    """The installed distribution as a wheel in `folder` (made there unless it already is)."""
    tags = [tag.split("-") for tag in _tag_values(distribution)]
    assert tags, f"{distribution.metadata['Name']} was not installed from a wheel"
    compressed = "-".join(".".join(sorted({tag[part] for tag in tags})) for part in range(3))
    name = re.sub(r"[-_.]+", "_", distribution.metadata["Name"]).lower()
    wheel = folder / f"{name}-{distribution.version}-{compressed}.whl"
    if wheel.exists():
        return wheel
    root = Path(str(distribution.locate_file("")))
    files = distribution.files or []
    (dist_info,) = {entry.parts[0] for entry in files if entry.parts[0].endswith(".dist-info")}
    record_name = f"{dist_info}/RECORD"
    record_lines: list[str] = []
    partial = temporary_path(wheel)
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            for entry in files:
                parts = entry.parts
                if (
                    parts[0] == ".."
                    or "__pycache__" in parts
                    or (parts[0] == dist_info and parts[-1] in _INSTALL_RECORDS)
                ):
                    continue
                source = root / entry
                data = source.read_bytes()
                archive.writestr(zipfile.ZipInfo.from_file(source, entry.as_posix()), data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record_lines.append(f"{entry.as_posix()},sha256={digest},{len(data)}")
            record_lines.append(f"{record_name},,")
            archive.writestr(record_name, "\n".join(record_lines) + "\n")
        os.replace(partial, wheel)
    finally:
        partial.unlink(missing_ok=True)
    return wheel


def prepared_wheelhouse(requirements: Iterable[Requirement], folder: Path = WHEELHOUSE) -> Path:
    """`folder` holding a wheel of every installed distribution that `requirements` need."""
    folder.mkdir(parents=True, exist_ok=True)
    for distribution in installed_closure(requirements).values():
        repack(distribution, folder)
    return folder

"""The model sets installed in a Triton repository, as `swapline models import` records them in its manifest.

Read by the importer, by `swapline models list` and by the embedded stack (which loads the sets marked
default with Triton); it imports nothing of ONNX, so reading the manifest costs a stack's start nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.media_paths import write_file
from services.model_build.face_model_contracts import ModelRole

MANIFEST_FILE = "model_sets.json"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the served Triton model; its FP32 twin is `twin`
    role: ModelRole
    stem: str  # the contract's (FaceFusion's) stem of the file it came from
    source_file: str
    twin: str
    batched: bool
    batch_rewritten: bool
    # An embedding swapper's `<name>_source` model (source_converter), which makes its source input.
    source_converter: str = ""


@dataclass(frozen=True)
class ModelSet:
    name: str
    models: tuple[ModelEntry, ...]
    # Marked default by the operator: loaded and warmed with the built-in set when Triton starts, and never
    # unloaded; the other sets load when a job names them.
    default: bool = False

    def served_models(self) -> tuple[str, ...]:
        """Every Triton model the set installed: each model, its FP32 twin and any source converter."""
        return tuple(name for entry in self.models for name in (entry.name, entry.twin, entry.source_converter) if name)


# What the repository serves without anything imported: the MTCNN cascade and the crop-to-crop swapper.
BUILT_IN_SET = ModelSet(
    "builtin",
    (
        ModelEntry("face_swapper", "swapper", "face_swapper", "make models", "face_swapper", True, False),
        ModelEntry("mtcnn_cascade", "detector", "mtcnn_cascade", "make models", "mtcnn_cascade", True, False),
    ),
)


def read_manifest(repository: Path) -> dict[str, ModelSet]:
    path = repository / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        defaults = set(record.get("default_sets", []))
        return {
            name: ModelSet(name, tuple(ModelEntry(**entry) for entry in entries), name in defaults)
            for name, entries in record["sets"].items()
        }
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument(f"{MANIFEST_FILE} of {repository.name} does not parse: {error}") from None


def write_manifest(repository: Path, sets: dict[str, ModelSet]) -> None:
    record = {
        "sets": {name: [dataclasses.asdict(entry) for entry in sets[name].models] for name in sorted(sets)},
        "default_sets": sorted(name for name, model_set in sets.items() if model_set.default),
    }
    write_file(repository / MANIFEST_FILE, (json.dumps(record, indent=1) + "\n").encode())


def installed_sets(repository: Path) -> list[ModelSet]:
    """The imported sets, by name."""
    sets = read_manifest(repository)
    return [sets[name] for name in sorted(sets)]


def default_set_models(repository: Path) -> tuple[str, ...]:
    """The Triton models of the sets marked default: loaded with the built-in set when Triton starts."""
    return tuple(
        name for model_set in installed_sets(repository) if model_set.default for name in model_set.served_models()
    )

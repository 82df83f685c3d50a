"""Installs a folder of the face models users already own (FaceFusion's `.assets/models`) as a model set.

For each file whose name FaceFusion gives one of the models swapline serves (face_model_contracts):
1. its tensors are checked against the contract (onnx_contract_check); a misfit refuses the whole import;
2. a graph fixed at batch 1 (inswapper's release) is rewritten so that Triton can batch it, and the
   rewrite is checked by running batch N against N single runs (onnx_rewrite);
3. the served build is FP16 with inputs and outputs in their types, and its FP32 twin is what a batch
   whose FP16 answer overflows runs again on: converted from an FP32 file, or upcast from an FP16 one;
4. both are written as Triton models (imported_model_config), `<name>` and `<name>_fp32`, and for an
   embedding swapper the model that makes its source input from an ArcFace embedding, `<name>_source`
   (source_converter).

Everything is built in a staging folder beside the repository first, so a refusal changes nothing that
is installed; then each model folder is swapped in by rename, and the sets' manifest (model_sets.json at
the repository's root, where Triton looks for no models) is rewritten last. Files of other models in the
folder are skipped and listed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import onnx

from services.common.errors import InvalidArgument, NotFound, SwaplineError
from services.common.face_model_catalog import fp32_twin_name, source_converter_name
from services.common.media_paths import write_file
from services.model_build.face_model_contracts import CONTRACTS, ModelContract
from services.model_build.imported_model_config import config_text, imported_config, is_batched
from services.model_build.model_sets import ModelEntry, ModelSet, read_manifest, write_manifest
from services.model_build.onnx_contract_check import check_model
from services.model_build.onnx_rewrite import batchable, fp16_twin, fp32_twin, is_fp16, verify_batch_equivalence
from services.model_build.source_converter import emap_of, source_converter
from services.triton.model_config import CONFIG_FILE, MODEL_FILE, MODEL_VERSION

ONNX_SUFFIX = ".onnx"
# FaceFusion ships some models also as an FP16 file under the stem plus this; both serve one model.
FP16_FILE_SUFFIX = "_fp16"
# Faces a batch carries when the batch rewrite is checked against single runs.
CHECK_BATCH = 2


@dataclass(frozen=True)
class ImportResult:
    model_set: ModelSet
    skipped: tuple[str, ...]  # file name and why


def served_name(stem: str) -> str:
    """inswapper_128_fp16 and inswapper_128 are one model, served as inswapper_128."""
    return stem.removesuffix(FP16_FILE_SUFFIX)


def _chosen_files(directory: Path) -> tuple[dict[str, tuple[Path, ModelContract]], list[str]]:
    """Per served model, the file to build it from (FP32 where both are given), and the files skipped."""
    if not directory.is_dir():
        raise NotFound(f"model folder {directory.name} does not exist")
    chosen: dict[str, tuple[Path, ModelContract]] = {}
    skipped: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ONNX_SUFFIX:
            continue
        contract = CONTRACTS.get(path.stem)
        if contract is None:
            skipped.append(f"{path.name}: not a model swapline serves")
            continue
        name = served_name(path.stem)
        if name in chosen and path.stem.endswith(FP16_FILE_SUFFIX):
            skipped.append(f"{path.name}: {chosen[name][0].name} is its FP32 original")
            continue
        if name in chosen:
            skipped.append(f"{chosen[name][0].name}: {path.name} is its FP32 original")
        chosen[name] = (path, contract)
    if not chosen:
        raise InvalidArgument(
            f"{directory.name} holds no model swapline serves; it takes {', '.join(sorted(CONTRACTS))} (.onnx)"
        )
    return chosen, skipped


@dataclass(frozen=True)
class _Builds:
    served: onnx.ModelProto  # FP16, inputs and outputs in their types
    twin: onnx.ModelProto  # FP32
    batch_rewritten: bool
    converter: onnx.ModelProto | None  # an embedding swapper's source converter


def _converter(original: onnx.ModelProto, contract: ModelContract, file_name: str) -> onnx.ModelProto | None:
    if contract.source_kind is None:
        return None
    emap = emap_of(original, file_name) if contract.source_kind == "emap_embedding" else None
    return source_converter(contract.source_kind, emap)


def _built(path: Path, contract: ModelContract) -> _Builds:
    """The served FP16 build, its FP32 twin and a swapper's source converter, each checked; errors name the file."""
    checked = check_model(path, contract)
    try:
        original = onnx.load(str(path))
        converter = _converter(original, contract, path.name)
        rewritten = checked.batch_fixed_at_one and all(
            tensor.batch_axis for tensor in (*contract.inputs, *contract.outputs)
        )
        model = batchable(original) if rewritten else original
        if rewritten:
            verify_batch_equivalence(original, model, batch_size=CHECK_BATCH)
        if is_fp16(model):
            return _Builds(model, fp32_twin(model), rewritten, converter)
        return _Builds(fp16_twin(model), model, rewritten, converter)
    except SwaplineError as error:
        raise type(error)(f"{path.name}: {error.message}") from None


def _write_model(folder: Path, model: onnx.ModelProto, text: str) -> None:
    (folder / MODEL_VERSION).mkdir(parents=True)
    write_file(folder / MODEL_VERSION / MODEL_FILE, model.SerializeToString())
    write_file(folder / CONFIG_FILE, text.encode())


def _stage(staging: Path, name: str, path: Path, contract: ModelContract) -> ModelEntry:
    builds = _built(path, contract)
    note = f"Imported from {path.name} by `swapline models import`"
    served, twin = builds.served, builds.twin
    side = contract.input_size
    _write_model(staging / name, served, config_text(imported_config(name, served, "fp16", side), f"{note} (FP16)."))
    _write_model(
        staging / fp32_twin_name(name),
        twin,
        config_text(imported_config(fp32_twin_name(name), twin, "fp32", side), f"{note}: the FP32 twin of {name}."),
    )
    converter = ""
    if builds.converter is not None:
        converter = source_converter_name(name)
        text = f"{note}: makes {name}'s source input from an ArcFace embedding (FP32)."
        _write_model(
            staging / converter,
            builds.converter,
            config_text(imported_config(converter, builds.converter, "fp32", side), text),
        )
    return ModelEntry(
        name,
        contract.role,
        contract.stem,
        path.name,
        fp32_twin_name(name),
        is_batched(served),
        builds.batch_rewritten,
        converter,
    )


def _swap_in(staged: Path, target: Path, trash: Path) -> None:
    if target.exists():
        os.replace(target, trash / target.name)
    os.replace(staged, target)


def import_model_set(directory: Path, repository: Path, set_name: str, default: bool = False) -> ImportResult:
    """Checks and builds every recognised file of `directory`, then installs them as the set `set_name`,
    marked default (loaded with Triton) when `default`."""
    if not set_name or "/" in set_name or set_name.startswith("."):
        raise InvalidArgument(f"set name {set_name[:64]!r} must be a plain, non-empty name")
    if not repository.is_dir():
        raise NotFound(f"model repository {repository} does not exist")
    chosen, skipped = _chosen_files(directory)
    # Beside the repository, on its file system (so the renames are atomic), where Triton looks for no models.
    staging = repository.parent / f".{repository.name}-import-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        entries = tuple(_stage(staging, name, path, contract) for name, (path, contract) in chosen.items())
        sets = read_manifest(repository)
        trash = staging / "replaced"
        trash.mkdir()
        installed = ModelSet(set_name, entries, default)
        for name in installed.served_models():
            _swap_in(staging / name, repository / name, trash)
        sets[set_name] = installed
        write_manifest(repository, sets)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(sets[set_name], tuple(skipped))

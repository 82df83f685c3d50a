"""`swapline models import DIR` and `swapline models list`: the face models an operator brings.

Import reads FaceFusion's file names from a folder (its `.assets/models`), checks each file against its
contract, and installs a set into the Triton model repository: the served FP16 build, its FP32 twin, and
the set's manifest. Nothing is installed unless every recognised file fits.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.cli.embedded_stack import DEFAULT_MODEL_REPOSITORY
from services.model_build.model_sets import BUILT_IN_SET, installed_sets


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers `models` and its subcommands on the CLI's subparsers (argparse's _SubParsersAction)."""
    parser: argparse.ArgumentParser = subparsers.add_parser("models", help="import and list face model sets")
    commands = parser.add_subparsers(dest="models_command", required=True)
    importing = commands.add_parser("import", help="install the models of a folder of ONNX files as a set")
    importing.add_argument("directory", type=Path, help="a folder of ONNX files named as FaceFusion names them")
    importing.add_argument("--set", dest="set_name", default="", help="the set's name (default: the folder's)")
    importing.add_argument("--repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    importing.add_argument(
        "--default",
        action="store_true",
        help="load the set with the built-in one when Triton starts, and never unload it",
    )
    importing.set_defaults(handler=import_command)
    listing = commands.add_parser("list", help="show the installed sets and their models")
    listing.add_argument("--repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    listing.set_defaults(handler=list_command)
    return parser


def import_command(args: argparse.Namespace) -> int:
    # Imported here: the importer brings onnx and onnxconverter-common, which no other command needs.
    from services.model_build.model_import import import_model_set

    name = args.set_name or args.directory.resolve().name
    result = import_model_set(args.directory, args.repository, name, args.default)
    for entry in result.model_set.models:
        notes = ", batch 1 rewritten for batching" if entry.batch_rewritten else ""
        print(f"installed {entry.name} ({entry.role}, from {entry.source_file}; FP32 twin {entry.twin}{notes})")
    for skipped in result.skipped:
        print(f"skipped {skipped}")
    print(f"set {result.model_set.name}: {len(result.model_set.models)} models in {args.repository}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    print(f"{BUILT_IN_SET.name} (built in): {', '.join(entry.name for entry in BUILT_IN_SET.models)}")
    for model_set in installed_sets(args.repository):
        models = ", ".join(f"{entry.name} ({entry.role})" for entry in model_set.models)
        marker = " (default: loaded with Triton)" if model_set.default else ""
        print(f"{model_set.name}{marker}: {models}")
    return 0

"""`swapline`: run a face swap end to end, run the stack, or talk to a running gateway."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from services.cli import advise_command, batch_command, commands, models_command
from services.cli.batch_inputs import IMAGE_SUFFIXES
from services.cli.embedded_stack import StackOptions
from services.cli.gpu_layout import (
    CORES_PER_FRAME_SERVICE_REPLICA,
    FRAME_SERVICE_REPLICAS_PER_GPU,
    FRAME_SERVICE_REPLICAS_WITHOUT_GPU,
    WORKERS_PER_GPU,
    WORKERS_WITHOUT_GPU,
)
from services.common.errors import SwaplineError
from services.common.face_model_catalog import BUILT_IN_DETECTOR, BUILT_IN_SWAPPER, DETECTOR_NAMES, SWAPPER_NAMES
from services.common.job_vocabulary import SELECTOR_MODES


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="image holding the face to put in")
    parser.add_argument("--target", required=True, help="video or image to swap faces in")
    parser.add_argument(
        "--target-uri",
        action="store_true",
        help="treat --target as a path under the gateway's media root instead of uploading it",
    )
    _swap_options(parser)


def _swap_options(parser: argparse.ArgumentParser) -> None:
    """How faces are chosen, swapped and encoded: the same for `run`, `submit` and each job of `batch`."""
    parser.add_argument(
        "--selector",
        choices=SELECTOR_MODES,
        default="one",
        help="which faces to replace: the largest, all, or those matching --reference",
    )
    parser.add_argument("--reference", default="", help="image of the face to replace, for --selector reference")
    parser.add_argument("--crf", type=int, default=0, help="x264 quality, 0-51 (0: the encoder's default)")
    parser.add_argument("--preset", default="", help="x264 preset (default: the encoder's)")
    parser.add_argument(
        "--swapper",
        choices=SWAPPER_NAMES,
        default=BUILT_IN_SWAPPER,
        help="face swapper: the built-in one, or an imported set's (`swapline models list`)",
    )
    parser.add_argument(
        "--detector",
        choices=DETECTOR_NAMES,
        default=BUILT_IN_DETECTOR,
        help="face detector: the built-in MTCNN, or an imported set's",
    )


def _stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="", help="where the embedded stack keeps media, database and logs")
    parser.add_argument(
        "--workers",
        type=int,
        default=StackOptions.workers,
        help=f"chunk workers in the embedded stack (default: {WORKERS_PER_GPU} per GPU while the cores last, "
        f"{WORKERS_WITHOUT_GPU} without a GPU)",
    )
    parser.add_argument(
        "--frame-service-replicas",
        type=int,
        default=StackOptions.frame_service_replicas,
        metavar="N",
        help=f"processes of each frame service (decoder, detector, encoder) in the embedded stack (default: "
        f"{FRAME_SERVICE_REPLICAS_PER_GPU} per GPU, one per {CORES_PER_FRAME_SERVICE_REPLICA} cores at most; "
        f"{FRAME_SERVICE_REPLICAS_WITHOUT_GPU} without a GPU)",
    )
    parser.add_argument(
        "--gpu-memory-budget",
        type=int,
        default=StackOptions.gpu_memory_budget_bytes,
        metavar="BYTES",
        help="GPU memory Triton's models may hold; the least recently used imported models are unloaded "
        "to stay within it (0: no budget; no GPU: off)",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="TLS on every listener and bearer tokens; credentials are generated in the work directory",
    )
    parser.add_argument(
        "--mtls",
        action="store_true",
        help="--secure, and the services also prove themselves to each other with certificates",
    )
    parser.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME",
        help=f"with --secure: a tenant to make a token for (repeatable; default: {', '.join(StackOptions.tenants)})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swapline", description=__doc__)
    parser.add_argument(
        "--gateway",
        default=commands.default_gateway(),
        help=f"gateway address host:port (default: ${commands.GATEWAY_ENV})",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="swap faces in a video or image and wait for the result")
    _job_options(run)
    _stack_options(run)
    run.add_argument("--output", required=True, help="where the swapped video or image goes")
    run.add_argument("--report", default="", help="directory for the job report")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=commands.run)

    up = sub.add_parser("up", help="run the embedded stack in the foreground")
    _stack_options(up)
    up.add_argument("--port", type=int, default=50051, help="gateway port")
    up.set_defaults(handler=commands.up)

    submit = sub.add_parser("submit", help="submit a job to a running gateway and print its id")
    _job_options(submit)
    submit.set_defaults(handler=commands.submit)

    for name, handler, text in (
        ("watch", commands.watch, "follow a job's progress until it ends"),
        ("get", commands.get, "print a job"),
        ("cancel", commands.cancel, "cancel a job"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(handler=handler)

    listing = sub.add_parser("list", help="list recent jobs")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(handler=commands.list_jobs)

    batch = sub.add_parser(
        "batch",
        help="swap each source face into each target of a directory; run it again to resume",
        description=batch_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument(
        "--sources",
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help=f"face images, or directories of them ({' '.join(IMAGE_SUFFIXES)})",
    )
    batch.add_argument(
        "--targets", required=True, metavar="DIR", help="directory of videos and images to swap faces in (by name)"
    )
    batch.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="where the outputs (<target stem>__<source stem><target suffix>) and the batch reports go",
    )
    batch.add_argument(
        "--target-uri",
        action="store_true",
        help="the targets directory is a path under the gateway's media root: name the targets, do not upload them",
    )
    _swap_options(batch)
    _stack_options(batch)
    batch.add_argument("--per-job", action="store_true", help="a line for each job as it ends")
    batch.add_argument(
        "--retry-failed",
        action="store_true",
        help="submit again, as a job of its own, each pair whose job failed or was cancelled (once per such job)",
    )
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(handler=batch_command.run_batch)

    advise_command.add_parser(sub)
    models_command.add_parser(sub)

    demo = sub.add_parser("demo", help="build a sample video from package-shipped photos and swap it")
    _stack_options(demo)
    demo.set_defaults(handler=commands.demo, workdir="demo-output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.handler(args))
    except SwaplineError as error:
        return commands.fail(error)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

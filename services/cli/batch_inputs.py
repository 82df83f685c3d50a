"""What `swapline batch` works on: the source faces and targets it finds, the outputs' names and the batch's key.

Everything here is a pure function of the command line and of what the files' metadata say, so the same
command over unchanged files names the same outputs and derives the same idempotency key: that is what
lets a re-run find the batch the interrupted run submitted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from services.common.errors import InvalidArgument, NotFound
from services.common.job_vocabulary import SelectorMode

ImageSuffix = Literal[".png", ".jpg", ".jpeg", ".webp", ".bmp"]
VideoSuffix = Literal[".mp4", ".mov", ".mkv", ".avi", ".webm"]
IMAGE_SUFFIXES: tuple[ImageSuffix, ...] = get_args(ImageSuffix)
VIDEO_SUFFIXES: tuple[VideoSuffix, ...] = get_args(VideoSuffix)
TARGET_SUFFIXES: tuple[str, ...] = (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES)
# Between the target's stem and the source's label in an output's name.
NAME_SEPARATOR = "__"
# Changes whenever what the key covers changes, so an older CLI's batch is never taken for this one's.
KEY_VERSION = "swapline-batch-key-1"
BATCH_KEY_PREFIX = "batch-"
REDO_KEY_PREFIX = "redo-"


@dataclass(frozen=True)
class InputFile:
    """A source or target as found on disk: its absolute path and what the key takes from its metadata."""

    path: Path
    size_bytes: int
    mtime_ns: int

    @classmethod
    def at(cls, path: Path) -> InputFile:
        stat = path.stat()
        return cls(path.absolute(), stat.st_size, stat.st_mtime_ns)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class BatchOptions:
    """What every job of the batch runs with (`swapline run`'s job options), and how targets reach the gateway."""

    selector: SelectorMode
    reference: InputFile | None
    crf: int
    preset: str
    swapper: str
    detector: str
    # The targets are named as paths under the gateway's media root instead of being uploaded.
    target_uri: bool


@dataclass(frozen=True)
class BatchPairName:
    """One job of the batch: targets[target_index] with sources[source_index], and its output's file name."""

    target_index: int
    source_index: int
    output_name: str


def _media_in(directory: Path, suffixes: Sequence[str]) -> list[Path]:
    """The directory's files with one of `suffixes` (any case), by name; hidden files and subfolders are not read."""
    return [
        entry
        for entry in sorted(directory.iterdir(), key=lambda entry: entry.name)
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in suffixes
    ]


def scan_sources(paths: Sequence[Path]) -> tuple[InputFile, ...]:
    """Image files as given, and the images of each directory given (by name, not recursive), in that order.

    A file named twice (directly and through its directory, say) counts once, where it first appears.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = _media_in(path, IMAGE_SUFFIXES)
            if not images:
                raise InvalidArgument(f"source directory {str(path)!r} holds no images ({' '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise InvalidArgument(f"source {str(path)!r} is not an image ({' '.join(IMAGE_SUFFIXES)})")
            found.append(path)
        else:
            raise NotFound(f"source {str(path)!r} does not exist")
    return tuple(InputFile.at(path) for path in dict.fromkeys(path.absolute() for path in found))


def scan_targets(directory: Path) -> tuple[InputFile, ...]:
    """The videos and images in `directory`, by name, not recursive."""
    if not directory.is_dir():
        raise NotFound(f"targets directory {str(directory)!r} does not exist")
    targets = _media_in(directory, TARGET_SUFFIXES)
    if not targets:
        raise InvalidArgument(f"targets directory {str(directory)!r} holds no videos or images")
    return tuple(InputFile.at(path) for path in targets)


def check_output_directory(output: Path, targets_dir: Path, sources: Sequence[InputFile]) -> None:
    """Outputs written among the inputs would be read as inputs by the next run."""
    resolved = output.resolve()
    if resolved == targets_dir.resolve():
        raise InvalidArgument("the output directory must not be the targets directory")
    if any(source.path.parent.resolve() == resolved for source in sources):
        raise InvalidArgument("the output directory must not hold source images")


def source_labels(sources: Sequence[InputFile]) -> tuple[str, ...]:
    """Each source's part of an output name: its stem; where stems are shared, stem-suffix; where those are
    shared too, a 1-based number in source order follows."""
    stems = Counter(source.path.stem for source in sources)
    labels = [
        source.path.stem if stems[source.path.stem] == 1 else f"{source.path.stem}-{source.path.suffix[1:].lower()}"
        for source in sources
    ]
    shared = Counter(labels)
    seen: Counter[str] = Counter()
    numbered: list[str] = []
    for label in labels:
        if shared[label] > 1:
            seen[label] += 1
            label = f"{label}-{seen[label]}"
        numbered.append(label)
    if len(set(numbered)) != len(numbered):
        clashing = sorted(label for label, count in Counter(numbered).items() if count > 1)
        raise InvalidArgument(f"sources give clashing output names ({', '.join(clashing)}); rename one of them")
    return tuple(numbered)


def output_name(target: Path, source_label: str) -> str:
    """`<target stem>__<source label><target suffix>`: the suffix keeps a.mp4's output apart from a.mov's."""
    return f"{target.stem}{NAME_SEPARATOR}{source_label}{target.suffix}"


def pair_names(targets: Sequence[InputFile], sources: Sequence[InputFile]) -> tuple[BatchPairName, ...]:
    """Every target with every source, targets outermost: BatchSpec's order when its pairs are left empty."""
    labels = source_labels(sources)
    return tuple(
        BatchPairName(target_index, source_index, output_name(target.path, labels[source_index]))
        for target_index, target in enumerate(targets)
        for source_index in range(len(sources))
    )


def _fingerprint(file: InputFile) -> list[str | int]:
    return [str(file.path), file.size_bytes, file.mtime_ns]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def batch_key(targets: Sequence[InputFile], sources: Sequence[InputFile], options: BatchOptions, output: Path) -> str:
    """`batch-<sha256>` over the inputs as found (paths, sizes, mtimes), the options and the output directory.

    Not over which outputs exist: a re-run that finds more of them finished gets the same key, so the
    gateway answers with the batch the first run submitted.
    """
    reference = options.reference
    covered = {
        "version": KEY_VERSION,
        "output": str(output.absolute()),
        "targets": [_fingerprint(target) for target in targets],
        "sources": [_fingerprint(source) for source in sources],
        "options": {
            **asdict(options),
            "reference": None if reference is None else _fingerprint(reference),
        },
    }
    return BATCH_KEY_PREFIX + _digest(covered)


def redo_key(key: str, pair: BatchPairName, replaced_job_id: str) -> str:
    """The key of the job that redoes a pair outside the batch: the same on every re-run that redoes the same
    thing (a skipped pair, or the output of job `replaced_job_id`), so re-running never duplicates it."""
    return REDO_KEY_PREFIX + _digest([key, pair.target_index, pair.source_index, replaced_job_id])

"""`swapline batch`'s inputs: what it scans, how outputs are named, and what its idempotency key covers."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from services.cli.batch_inputs import (
    BatchOptions,
    BatchPairName,
    InputFile,
    batch_key,
    check_output_directory,
    output_name,
    pair_names,
    redo_key,
    scan_sources,
    scan_targets,
    source_labels,
)
from services.common.errors import InvalidArgument, NotFound

OPTIONS = BatchOptions(
    selector="one", reference=None, crf=0, preset="", swapper="face_swapper", detector="mtcnn", target_uri=False
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files(*paths: str) -> tuple[InputFile, ...]:
    return tuple(InputFile(Path(path), 1, 1) for path in paths)


def test_an_output_keeps_the_target_suffix_so_a_mp4_and_a_mov_do_not_collide() -> None:
    assert output_name(Path("clips/a.mp4"), "grace") == "a__grace.mp4"
    assert output_name(Path("clips/a.mov"), "grace") == "a__grace.mov"


def test_sources_sharing_a_stem_are_told_apart_by_their_suffix_then_by_number() -> None:
    assert source_labels(files("f/x.png", "o/x.jpg", "f/y.png")) == ("x-png", "x-jpg", "y")
    assert source_labels(files("f/x.png", "o/x.png")) == ("x-png-1", "x-png-2")


def test_labels_that_still_clash_are_refused() -> None:
    assert source_labels(files("f/x.png", "o/x.jpg", "o/x-png.png")) == ("x-png-1", "x-jpg", "x-png-2")
    with pytest.raises(InvalidArgument, match="x-png-1"):
        source_labels(files("f/x.png", "o/x.png", "o/x-png-1.jpg"))


def test_pairs_are_every_target_with_every_source_targets_outermost() -> None:
    pairs = pair_names(files("t/a.mp4", "t/b.mov"), files("f/x.png", "o/x.jpg"))
    assert pairs == (
        BatchPairName(0, 0, "a__x-png.mp4"),
        BatchPairName(0, 1, "a__x-jpg.mp4"),
        BatchPairName(1, 0, "b__x-png.mov"),
        BatchPairName(1, 1, "b__x-jpg.mov"),
    )


def test_targets_are_the_directorys_media_by_name_without_subfolders_or_hidden_files(tmp_path: Path) -> None:
    for name in ("b.MOV", "a.mp4", "c.png", "notes.txt", ".a__x.mp4.1f.part", "sub/d.mp4"):
        touch(tmp_path / name)
    assert [target.path.name for target in scan_targets(tmp_path)] == ["a.mp4", "b.MOV", "c.png"]
    assert scan_targets(tmp_path)[0].path.is_absolute()


def test_an_empty_or_missing_targets_directory_is_refused(tmp_path: Path) -> None:
    touch(tmp_path / "notes.txt")
    with pytest.raises(InvalidArgument, match="no videos or images"):
        scan_targets(tmp_path)
    with pytest.raises(NotFound):
        scan_targets(tmp_path / "missing")


def test_sources_are_files_and_directories_in_the_order_given_each_once(tmp_path: Path) -> None:
    touch(tmp_path / "faces" / "b.jpg")
    touch(tmp_path / "faces" / "a.png")
    touch(tmp_path / "faces" / "readme.md")
    single = touch(tmp_path / "z.webp")
    found = scan_sources([single, tmp_path / "faces", tmp_path / "faces" / "a.png"])
    assert [source.path.name for source in found] == ["z.webp", "a.png", "b.jpg"]


def test_a_source_that_is_no_image_or_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not an image"):
        scan_sources([touch(tmp_path / "clip.mp4")])
    with pytest.raises(NotFound):
        scan_sources([tmp_path / "missing.png"])
    with pytest.raises(InvalidArgument, match="holds no images"):
        scan_sources([touch(tmp_path / "empty" / "notes.txt").parent])


def test_outputs_may_not_go_among_the_inputs(tmp_path: Path) -> None:
    sources = scan_sources([touch(tmp_path / "faces" / "x.png")])
    with pytest.raises(InvalidArgument, match="targets directory"):
        check_output_directory(tmp_path / "clips" / ".", tmp_path / "clips", sources)
    with pytest.raises(InvalidArgument, match="source images"):
        check_output_directory(tmp_path / "faces", tmp_path / "clips", sources)
    check_output_directory(tmp_path / "out", tmp_path / "clips", sources)


def test_the_key_is_stable_and_covers_paths_sizes_mtimes_options_and_the_output(tmp_path: Path) -> None:
    target = touch(tmp_path / "clips" / "a.mp4", b"video")
    source = touch(tmp_path / "faces" / "x.png", b"face")
    output = tmp_path / "out"

    def key(options: BatchOptions = OPTIONS, out: Path = output) -> str:
        return batch_key(scan_targets(target.parent), scan_sources([source]), options, out)

    first = key()
    assert first == key() and first.startswith("batch-") and len(first) <= 128
    # Outputs appearing do not change it: a re-run that finds some done gets the same batch.
    touch(output / "a__x.mp4")
    assert key() == first
    assert key(replace(OPTIONS, crf=30)) != first
    assert key(out=tmp_path / "elsewhere") != first
    os.utime(target, ns=(1, 1))
    assert key() != first
    touched = key()
    touch(source, b"another face")
    assert key() != touched


def test_a_redo_key_is_the_same_for_the_same_pair_and_replaced_job_only() -> None:
    pair = BatchPairName(0, 1, "a__x.mp4")
    key = redo_key("batch-1", pair, "skipped")
    assert key == redo_key("batch-1", pair, "skipped") and len(key) <= 128
    assert key != redo_key("batch-1", pair, "job-7")
    assert key != redo_key("batch-1", replace(pair, source_index=0), "skipped")
    assert key != redo_key("batch-2", pair, "skipped")

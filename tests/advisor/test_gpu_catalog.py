from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.gpu_catalog import GIB, MIB, SOURCED_FIGURES, catalog_from_data, load_catalog
from tests.advisor.recorded_reports import gpu_entry

REQUIRED_GPUS = (
    "RTX 3060 12GB",
    "RTX 4090 24GB",
    "L4 24GB",
    "A10G 24GB",
    "T4 16GB",
    "L40S 48GB",
    "A100 80GB",
    "H100 80GB SXM",
    "H200 141GB",
)


def test_the_packaged_catalog_holds_every_required_gpu_with_a_source_per_figure() -> None:
    catalog = load_catalog()

    assert {gpu.name for gpu in catalog.gpus} >= set(REQUIRED_GPUS)
    for gpu in catalog.gpus:
        assert set(gpu.sources) == set(SOURCED_FIGURES)
        assert gpu.memory_bytes > 8 * GIB and gpu.price_per_hour_usd > 0


def test_nvml_model_names_find_their_entry() -> None:
    catalog = load_catalog()

    h100 = catalog.find("NVIDIA H100 80GB HBM3")
    t4 = catalog.find("  tesla   T4 ")

    assert h100 is not None and h100.name == "H100 80GB SXM"
    assert h100.memory_bytes == 81559 * MIB
    assert t4 is not None and t4.name == "T4 16GB"
    assert catalog.find("NVIDIA B200") is None
    assert catalog.find("") is None


def test_an_override_file_replaces_the_packaged_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "gpus:\n"
        "  - name: Tiny\n"
        "    nvml_names: [NVIDIA Tiny]\n"
        "    memory_mib: 2048\n"
        "    fp16_tensor_tflops: 10\n"
        "    memory_bandwidth_gbps: 100\n"
        "    video_decoders: 1\n"
        "    price_per_hour_usd: 0.05\n"
        "    source: {memory: a, fp16_tensor_tflops: b, memory_bandwidth_gbps: c, video_decoders: d,"
        " price_per_hour_usd: e}\n"
    )

    catalog = load_catalog(path)

    assert [gpu.name for gpu in catalog.gpus] == ["Tiny"]
    assert catalog.gpus[0].memory_bytes == 2 * GIB


def _broken(change: str) -> dict[str, Any]:
    entry = gpu_entry("Card", 16, 1.0)
    if change == "unknown key":
        entry["tdp_watts"] = 300
    elif change == "missing field":
        del entry["price_per_hour_usd"]
    elif change == "wrong type":
        entry["fp16_tensor_tflops"] = "fast"
    elif change == "negative number":
        entry["price_per_hour_usd"] = -0.5
    elif change == "fractional decoders":
        entry["video_decoders"] = 1.5
    elif change == "missing source":
        del entry["source"]["memory_bandwidth_gbps"]
    elif change == "unknown source":
        entry["source"]["colour"] = "green"
    elif change == "memory twice":
        entry["memory_bytes"] = 16 * GIB
    elif change == "no memory":
        del entry["memory_gib"]
    elif change == "bad nvml names":
        entry["nvml_names"] = "NVIDIA Card"
    return {"gpus": [gpu_entry("Other", 8, 0.5), entry]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("unknown key", "entry 1 (Card): field 'tdp_watts' is not a catalog field"),
        ("missing field", "entry 1 (Card): field 'price_per_hour_usd' is missing"),
        ("wrong type", "entry 1 (Card): field 'fp16_tensor_tflops' must be a number, got 'fast'"),
        ("negative number", "entry 1 (Card): field 'price_per_hour_usd' must not be negative, got -0.5"),
        ("fractional decoders", "entry 1 (Card): field 'video_decoders' must be an integer, got 1.5"),
        ("missing source", "entry 1 (Card): field 'source.memory_bandwidth_gbps' is missing"),
        ("unknown source", "entry 1 (Card): field 'source.colour' is not a figure"),
        ("memory twice", "entry 1 (Card): field 'memory' must be given exactly once"),
        ("no memory", "entry 1 (Card): field 'memory' must be given exactly once"),
        ("bad nvml names", "entry 1 (Card): field 'nvml_names' must be a list of non-empty strings"),
    ],
)
def test_a_malformed_entry_is_rejected_naming_the_entry_and_field(change: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        catalog_from_data(_broken(change))

    assert message in raised.value.message


def test_an_entry_without_a_name_is_named_by_position() -> None:
    entry = gpu_entry("Card", 16, 1.0)
    del entry["name"]

    with pytest.raises(InvalidArgument, match="entry 0: field 'name' must be a non-empty string"):
        catalog_from_data({"gpus": [entry]})


def test_two_entries_claiming_one_nvml_name_are_rejected() -> None:
    first, second = gpu_entry("A", 8, 0.5), gpu_entry("B", 16, 1.0)
    second["nvml_names"] = copy.deepcopy(first["nvml_names"])

    with pytest.raises(InvalidArgument, match="'NVIDIA A' is already used by A"):
        catalog_from_data({"gpus": [first, second]})


@pytest.mark.parametrize("data", [None, [], {"gpus": []}, {"gpus": [], "extra": 1}, {"gpu": [gpu_entry("A", 8, 1)]}])
def test_a_document_of_the_wrong_shape_is_rejected(data: Any) -> None:
    with pytest.raises(InvalidArgument, match="gpus"):
        catalog_from_data(data)


def test_invalid_yaml_and_a_missing_file_are_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("gpus: [unclosed\n")

    with pytest.raises(InvalidArgument, match="not valid YAML"):
        load_catalog(broken)
    with pytest.raises(NotFound, match="does not exist"):
        load_catalog(tmp_path / "absent.yaml")

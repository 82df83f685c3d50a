"""The GPU catalog: each GPU's memory, throughput, decoders, price and where each figure came from."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from services.common.errors import InvalidArgument, NotFound

PACKAGED_CATALOG = Path(__file__).with_name("gpu_catalog.yaml")
MIB = 1024 * 1024
GIB = 1024 * MIB

# The figures every entry carries; each needs a line in the entry's `source`.
SourcedFigure = Literal["memory", "fp16_tensor_tflops", "memory_bandwidth_gbps", "video_decoders", "price_per_hour_usd"]
SOURCED_FIGURES: tuple[SourcedFigure, ...] = get_args(SourcedFigure)
# Memory may be written in one of these units.
MemoryKey = Literal["memory_bytes", "memory_mib", "memory_gib"]
MEMORY_KEYS: tuple[MemoryKey, ...] = get_args(MemoryKey)
_MEMORY_SCALE: dict[MemoryKey, int] = {"memory_bytes": 1, "memory_mib": MIB, "memory_gib": GIB}
_REQUIRED_KEYS = frozenset(
    {
        "name",
        "nvml_names",
        "fp16_tensor_tflops",
        "memory_bandwidth_gbps",
        "video_decoders",
        "price_per_hour_usd",
        "source",
    }
)
# Whether FP16 runs at least as fast as FP32 (Tensor Cores, or Pascal's P100): true unless an entry says
# otherwise, with a source. Where false, Triton serves the FP32 builds from the start (services/triton).
FAST_FP16_KEY = "fast_fp16"
_ALLOWED_KEYS = _REQUIRED_KEYS | frozenset(MEMORY_KEYS) | {FAST_FP16_KEY}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    nvml_names: tuple[str, ...]
    memory_bytes: int
    fp16_tensor_tflops: float
    memory_bandwidth_gbps: float
    video_decoders: int
    price_per_hour_usd: float
    sources: Mapping[str, str]
    fast_fp16: bool = True

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


def _normalised(model: str) -> str:
    return " ".join(model.lower().split())


@dataclass(frozen=True)
class GpuCatalog:
    gpus: tuple[GpuSpec, ...]

    def find(self, gpu_model: str) -> GpuSpec | None:
        """The entry an NVML model name (or a catalog name) denotes; None for a GPU the catalog lacks."""
        wanted = _normalised(gpu_model)
        if not wanted:
            return None
        for gpu in self.gpus:
            if wanted == _normalised(gpu.name) or wanted in {_normalised(name) for name in gpu.nvml_names}:
                return gpu
        return None

    def named(self, name: str) -> GpuSpec:
        gpu = self.find(name)
        if gpu is None:
            raise NotFound(f"GPU {name!r} is not in the catalog ({', '.join(g.name for g in self.gpus)})")
        return gpu


def _fail(where: str, key: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"GPU catalog {where}: field '{key}' {problem}")


def _number(entry: Mapping[str, Any], where: str, key: str, *, integer: bool = False) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _fail(where, key, f"must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _fail(where, key, f"must not be negative, got {value!r}")
    return float(value)


def _positive(entry: Mapping[str, Any], where: str, key: str) -> float:
    value = _number(entry, where, key)
    if value == 0:
        raise _fail(where, key, "must be positive, got 0")
    return value


def _text_list(entry: Mapping[str, Any], where: str, key: str) -> tuple[str, ...]:
    value = entry[key]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise _fail(where, key, f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _memory_bytes(entry: Mapping[str, Any], where: str) -> int:
    given = [key for key in MEMORY_KEYS if key in entry]
    if len(given) != 1:
        raise _fail(where, "memory", f"must be given exactly once as one of {', '.join(MEMORY_KEYS)}, got {given}")
    key = given[0]
    value = _number(entry, where, key, integer=key != "memory_gib")
    if value == 0:
        raise _fail(where, key, "must be positive, got 0")
    return round(value * _MEMORY_SCALE[key])


def _sources(entry: Mapping[str, Any], where: str) -> dict[str, str]:
    sources = entry["source"]
    if not isinstance(sources, Mapping):
        raise _fail(where, "source", f"must map each figure to where it came from, got {sources!r}")
    figures = (*SOURCED_FIGURES, FAST_FP16_KEY) if FAST_FP16_KEY in entry else SOURCED_FIGURES
    unknown = sorted(set(sources) - set(figures))
    if unknown:
        raise _fail(where, f"source.{unknown[0]}", f"is not a figure; figures are {', '.join(figures)}")
    for figure in figures:
        text = sources.get(figure)
        if not isinstance(text, str) or not text.strip():
            raise _fail(where, f"source.{figure}", "is missing: say where the figure came from")
    return {figure: str(sources[figure]) for figure in figures}


def _fast_fp16(entry: Mapping[str, Any], where: str) -> bool:
    value = entry.get(FAST_FP16_KEY, True)
    if not isinstance(value, bool):
        raise _fail(where, FAST_FP16_KEY, f"must be true or false, got {value!r}")
    return value


def _gpu_spec(entry: Any, position: int) -> GpuSpec:
    where = f"entry {position}"
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"GPU catalog {where} must be a mapping, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, "name", f"must be a non-empty string, got {name!r}")
    where = f"entry {position} ({name})"
    unknown = sorted(set(entry) - _ALLOWED_KEYS)
    if unknown:
        raise _fail(where, unknown[0], f"is not a catalog field; fields are {', '.join(sorted(_ALLOWED_KEYS))}")
    missing = sorted(_REQUIRED_KEYS - set(entry))
    if missing:
        raise _fail(where, missing[0], "is missing")
    return GpuSpec(
        name=name,
        nvml_names=_text_list(entry, where, "nvml_names"),
        memory_bytes=_memory_bytes(entry, where),
        fp16_tensor_tflops=_positive(entry, where, "fp16_tensor_tflops"),
        memory_bandwidth_gbps=_positive(entry, where, "memory_bandwidth_gbps"),
        video_decoders=int(_number(entry, where, "video_decoders", integer=True)),
        price_per_hour_usd=_number(entry, where, "price_per_hour_usd"),
        sources=_sources(entry, where),
        fast_fp16=_fast_fp16(entry, where),
    )


def catalog_from_data(data: Any) -> GpuCatalog:
    """Validates a parsed catalog document: `gpus:` a non-empty list of entries with unique names."""
    if not isinstance(data, Mapping) or set(data) != {"gpus"}:
        raise InvalidArgument("a GPU catalog must be a mapping with exactly one key, 'gpus'")
    entries = data["gpus"]
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise InvalidArgument("GPU catalog field 'gpus' must be a non-empty list")
    gpus = tuple(_gpu_spec(entry, position) for position, entry in enumerate(entries))
    seen: dict[str, str] = {}
    for gpu in gpus:
        for label in (gpu.name, *gpu.nvml_names):
            owner = seen.setdefault(_normalised(label), gpu.name)
            if owner != gpu.name:
                raise InvalidArgument(f"GPU catalog entry ({gpu.name}): name {label!r} is already used by {owner}")
    return GpuCatalog(gpus)


def load_catalog(path: str | Path = "") -> GpuCatalog:
    """Reads the catalog at `path`, or the packaged one when `path` is empty."""
    source = Path(path) if str(path) else PACKAGED_CATALOG
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"GPU catalog {source} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InvalidArgument(f"GPU catalog {source} is not valid YAML: {error}") from None
    return catalog_from_data(data)

"""Which models one Triton server holds, within its GPU memory budget: the least recently used go first.

A model's GPU memory is measured as the change of the GPU's used memory around its load and remembered
across unloads; before its first load it is estimated from its files (estimated_bytes), and the plan is
checked again once the load has measured it. One lock
serialises every load and unload of the server: two requests that each fit must not both plan against
the same free memory, and a measured change must belong to one load only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.gpu_telemetry import GpuUnavailable

log = logging.getLogger(__name__)

# Triton's repository index state of a model that serves requests.
READY_STATE = "READY"
MAX_MODELS_PER_REQUEST = 32
MAX_MODEL_NAME_LENGTH = 256


class MemoryReader(Protocol):
    """The used memory of the GPU the Triton server runs its models on, in bytes (blocking; NVML or a test's)."""

    def used_bytes(self) -> int: ...


class ModelRepository(Protocol):
    """What residency asks of a Triton server's model repository API."""

    async def states(self) -> Mapping[str, str]:
        """Every model the repository holds, by name, with its state ("READY" when it serves; "" never loaded)."""
        ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None:
        """Returns once the model no longer holds its memory."""
        ...


@dataclass(frozen=True)
class ModelFootprint:
    name: str
    bytes: int
    measured: bool


@dataclass(frozen=True)
class ResidentModel:
    footprint: ModelFootprint
    pinned: bool


@dataclass(frozen=True)
class Residency:
    """The loaded models, the most recently used first; budget_bytes None when no budget is enforced."""

    models: tuple[ResidentModel, ...]
    budget_bytes: int | None

    @property
    def resident_bytes(self) -> int:
        return sum(model.footprint.bytes for model in self.models)


@dataclass(frozen=True)
class EnsureOutcome:
    loaded: tuple[str, ...]
    # Least recently used first.
    unloaded: tuple[str, ...]


def estimated_bytes(model_dir: Path) -> int:
    """GPU memory a model is expected to take before it was ever loaded: the size of its files.

    The rule: the bytes of every file under the model's repository folder (links followed), which the
    weights dominate. A runtime holds at least its weights on the GPU, plus activations and workspace
    that only a load reveals, so this is a lower bound; the measurement after the first load replaces it.
    """
    return sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())


def _bytes_text(footprint: ModelFootprint) -> str:
    return f"{footprint.name} ({footprint.bytes:,} bytes{'' if footprint.measured else ', estimated'})"


def plan_unloads(
    resident: Sequence[ModelFootprint],
    requested: Sequence[ModelFootprint],
    budget_bytes: int,
    pinned: Collection[str],
    busy: Collection[str],
) -> tuple[str, ...]:
    """The resident models (given least recently used first) to unload, in order, so that the requested ones
    (loaded or not) fit the budget beside what stays.

    Pinned and requested models are never unloaded. Busy ones (used by a running job) are not either: a
    request that could fit only by unloading them fails as ResourceExhausted, to be tried again later. A
    request that cannot fit beside the pinned models at all fails as ResourceExhausted naming its models,
    their bytes and the budget.
    """
    requested_names = {model.name for model in requested}
    needed = sum(model.bytes for model in requested)
    held_by_pinned = sum(
        model.bytes for model in resident if model.name in pinned and model.name not in requested_names
    )
    if needed + held_by_pinned > budget_bytes:
        raise ResourceExhausted(
            f"the job's models {', '.join(map(_bytes_text, requested))} need {needed:,} bytes of GPU memory "
            f"together; this Triton server's budget is {budget_bytes:,} bytes, of which its pinned models "
            f"hold {held_by_pinned:,}"
        )
    resident_names = {model.name for model in resident}
    usage = sum(model.bytes for model in resident) + sum(
        model.bytes for model in requested if model.name not in resident_names
    )
    unloads: list[str] = []
    for model in resident:
        if usage <= budget_bytes:
            break
        if model.name in pinned or model.name in requested_names or model.name in busy:
            continue
        unloads.append(model.name)
        usage -= model.bytes
    if usage > budget_bytes:
        waiting_for = sorted(name for name in busy if name in resident_names and name not in requested_names)
        raise ResourceExhausted(
            f"the job's models need {usage - budget_bytes:,} bytes more than the budget of {budget_bytes:,} "
            f"leaves free; only unloading {', '.join(waiting_for)}, which running jobs use, would make room"
        )
    return tuple(unloads)


def _checked_names(models: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(models))
    if not names:
        raise InvalidArgument("no models named: a job needs at least one")
    if len(names) > MAX_MODELS_PER_REQUEST:
        raise InvalidArgument(f"{len(names)} models named; a job needs at most {MAX_MODELS_PER_REQUEST}")
    for name in names:
        if not name or len(name) > MAX_MODEL_NAME_LENGTH:
            raise InvalidArgument(f"model name {name[:64]!r} must be 1 to {MAX_MODEL_NAME_LENGTH} characters")
    return names


class ModelResidency:
    """Loads and unloads the models of one Triton server; `budget_bytes` 0 or no `memory` turns the budget off."""

    def __init__(
        self,
        repository: ModelRepository,
        model_files: Path,
        memory: MemoryReader | None,
        budget_bytes: int,
        pinned: Collection[str],
        busy_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repository = repository
        self._model_files = model_files
        self._memory = memory
        self._budget = budget_bytes if memory is not None and budget_bytes > 0 else None
        self._pinned = frozenset(pinned)
        self._busy_seconds = busy_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        # The loaded models with the clock's time of their last use, least recently used first.
        self._last_used: dict[str, float] = {}
        self._measured: dict[str, int] = {}
        # Estimates from the model folders, by folder and its modification time: a plan reads every resident
        # model's footprint, and walking each folder's files for it on every request was wasted work on the loop.
        self._estimates: dict[str, tuple[int, int]] = {}

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    async def start(self) -> tuple[str, ...]:
        """Loads the pinned models the repository holds; returns the pinned names it lacks."""
        async with self._lock:
            states = await self._synchronised()
            absent = tuple(sorted(name for name in self._pinned if name not in states))
            if absent:
                log.warning("pinned models %s are not in the repository: not loaded", ", ".join(absent))
            await self._load_pinned(states)
            if self._budget is not None:
                pinned_bytes = sum(self._footprint(name).bytes for name in self._pinned if name in self._last_used)
                if pinned_bytes > self._budget:
                    log.warning(
                        "the pinned models hold %d bytes, more than the budget of %d: every other load will fail",
                        pinned_bytes,
                        self._budget,
                    )
            return absent

    async def ensure_loaded(self, models: Sequence[str]) -> EnsureOutcome:
        """Makes every model in `models` ready, unloading the least recently used others where the budget
        needs it, and marks them the most recently used.

        The plan is made before the loads, on estimates for models never loaded, and again after them on
        what the loads measured. A request refused then has the models it loaded unloaded again.
        """
        names = _checked_names(models)
        async with self._lock:
            states = await self._synchronised()
            unknown = [name for name in names if name not in states]
            if unknown:
                raise NotFound(f"models {', '.join(name[:64] for name in unknown)} are not in the model repository")
            await self._load_pinned(states)
            missing = tuple(name for name in names if name not in self._last_used)
            if not missing:
                self._mark_used(names)
                return EnsureOutcome((), ())
            unloaded = self._unloads_for(names)
            await self._unload_all(unloaded, missing)
            for name in missing:
                await self._load(name)
            # A first load may prove a model larger than its estimate: what it measured is planned again.
            try:
                late = self._unloads_for(names)
            except ResourceExhausted:
                await self._unload_all([name for name in missing if name not in self._pinned], ())
                raise
            await self._unload_all(late, missing)
            self._mark_used(names)
            return EnsureOutcome(missing, unloaded + late)

    async def _load_pinned(self, states: Mapping[str, str]) -> None:
        """Loads the pinned models the repository holds that do not serve: at start, and after Triton restarted."""
        for name in sorted(name for name in self._pinned if name in states and name not in self._last_used):
            await self._load(name)

    def _unloads_for(self, names: Sequence[str]) -> tuple[str, ...]:
        if self._budget is None:
            return ()
        now = self._clock()
        busy = {name for name, used in self._last_used.items() if now - used < self._busy_seconds}
        resident = [self._footprint(name) for name in self._last_used]
        requested = [self._footprint(name) for name in names]
        return plan_unloads(resident, requested, self._budget, self._pinned, busy)

    async def _unload_all(self, names: Sequence[str], making_room_for: Sequence[str]) -> None:
        for name in names:
            await self._repository.unload(name)
            del self._last_used[name]
            if making_room_for:
                log.info("unloaded %s to make room for %s", name, ", ".join(making_room_for))

    def _mark_used(self, names: Sequence[str]) -> None:
        now = self._clock()
        for name in names:
            self._last_used.pop(name, None)
            self._last_used[name] = now

    def residency(self) -> Residency:
        models = tuple(ResidentModel(self._footprint(name), name in self._pinned) for name in reversed(self._last_used))
        return Residency(models, self._budget)

    async def _synchronised(self) -> Mapping[str, str]:
        """Triton's index, with the resident table brought in line with it: a restarted Triton has dropped
        what it served, and models loaded at its start (--load-model) count as the least recently used."""
        states = await self._repository.states()
        ready = {name for name, state in states.items() if state == READY_STATE}
        kept = {name: used for name, used in self._last_used.items() if name in ready}
        found = {name: float("-inf") for name in sorted(ready - set(kept))}
        self._last_used = {**found, **kept}
        return states

    async def _load(self, name: str) -> None:
        before = await self._used_bytes()
        await self._repository.load(name)
        self._last_used[name] = self._clock()
        after = await self._used_bytes()
        if before is None or after is None:
            return
        if after > before:
            self._measured[name] = after - before
        else:
            log.warning(
                "loading %s changed the GPU's used memory by %d bytes; its estimate stays", name, after - before
            )

    async def _used_bytes(self) -> int | None:
        if self._memory is None:
            return None
        try:
            return await asyncio.to_thread(self._memory.used_bytes)
        except GpuUnavailable as error:
            log.warning("GPU memory unreadable (%s): this load is not measured", error.reason)
            return None

    def _footprint(self, name: str) -> ModelFootprint:
        measured = self._measured.get(name)
        if measured is not None:
            return ModelFootprint(name, measured, True)
        model_dir = self._model_files / name
        if not model_dir.is_dir():
            if self._budget is None:
                return ModelFootprint(name, 0, False)
            raise FailedPrecondition(
                f"model {name} has no folder {model_dir} to estimate its GPU memory from; "
                "model_repository must be the repository Triton serves"
            )
        changed = model_dir.stat().st_mtime_ns
        known = self._estimates.get(name)
        if known is None or known[0] != changed:
            known = self._estimates[name] = (changed, estimated_bytes(model_dir))
        return ModelFootprint(name, known[1], False)

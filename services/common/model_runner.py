"""What detector and swapper code need from an inference server: Triton in services, ORT in-process in bench."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


class ModelRunner(Protocol):
    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]: ...


@runtime_checkable
class ModelCatalog(Protocol):
    async def output_names(self, model: str) -> tuple[str, ...]:
        """The model's outputs in order: for imported models whose outputs are known by position only."""
        ...

    async def is_model_ready(self, model: str) -> bool: ...

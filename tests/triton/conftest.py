from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.triton.local_models import LocalModels
from services.triton.server_process import EmbeddedTriton

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"


@pytest.fixture(scope="session")
def embedded_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    """The real tritonserver serving every model of triton_models/ (built by `make models`)."""
    with EmbeddedTriton(PRODUCTION_REPOSITORY, tmp_path_factory.mktemp("triton"), startup_timeout=90) as triton:
        yield triton


@pytest.fixture(scope="session")
def local_models() -> Iterator[LocalModels]:
    models = LocalModels(PRODUCTION_REPOSITORY)
    yield models
    models.close()

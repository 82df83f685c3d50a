from __future__ import annotations

import typing
from typing import Any

import pytest

from services.common.errors import InvalidArgument
from services.worker.arcface_embedder import ArcFaceEmbedder
from services.worker.embedding_swapper import EmbeddingSwapper
from services.worker.face_swapper import HOST_CROPS, CropTransferSwapper
from services.worker.swapper_registry import SwapperRegistry

UNUSED = typing.cast(Any, object())


def registry() -> tuple[SwapperRegistry, CropTransferSwapper]:
    built_in = CropTransferSwapper(UNUSED)
    return SwapperRegistry(built_in, UNUSED, UNUSED, HOST_CROPS, ArcFaceEmbedder(UNUSED, UNUSED)), built_in


def test_the_built_in_name_and_an_empty_one_give_the_built_in_swapper() -> None:
    swappers, built_in = registry()
    assert swappers.swapper("") is built_in and swappers.swapper("face_swapper") is built_in


def test_an_imported_swapper_is_made_once_at_its_own_crop_size() -> None:
    swappers, _ = registry()
    inswapper = swappers.swapper("inswapper_128")
    assert isinstance(inswapper, EmbeddingSwapper) and inswapper.target_layout.size == 128
    assert swappers.swapper("inswapper_128") is inswapper


def test_an_unknown_swapper_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="simswap"):
        registry()[0].swapper("simswap_256")

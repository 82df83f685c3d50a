from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.face_model_catalog import (
    EMBEDDING_SWAPPERS,
    WARP_TEMPLATES,
    JobModels,
    checked_detector,
    checked_swapper,
    imported_models_of,
    job_models,
    source_converter_name,
)


def test_empty_names_are_the_built_in_models() -> None:
    assert job_models("", "") == JobModels("face_swapper", "mtcnn")


def test_known_names_pass() -> None:
    assert job_models("hyperswap_1b_256", "yoloface_8n") == JobModels("hyperswap_1b_256", "yoloface_8n")


def test_unknown_swapper_names_the_choices() -> None:
    with pytest.raises(InvalidArgument, match="inswapper_128"):
        checked_swapper("simswap_512")


def test_unknown_detector_names_the_choices() -> None:
    with pytest.raises(InvalidArgument, match="retinaface_10g"):
        checked_detector("dlib")


def test_arcface_128_is_arcface_112_v2_in_a_128_pixel_crop_shifted_8_pixels() -> None:
    shifted = WARP_TEMPLATES["arcface_112_v2"] * 112 / 128 + np.array([8 / 128, 0], np.float32)
    assert np.abs(shifted - WARP_TEMPLATES["arcface_128"]).max() < 1e-6


def test_every_embedding_swapper_crops_on_arcface_128() -> None:
    assert {spec.template for spec in EMBEDDING_SWAPPERS.values()} == {"arcface_128"}


def test_source_converter_is_named_after_its_swapper() -> None:
    assert source_converter_name("inswapper_128") == "inswapper_128_source"


def test_a_built_in_job_needs_no_imported_models() -> None:
    assert imported_models_of(JobModels()) == ()


def test_an_embedding_swapper_job_needs_its_twin_converter_and_arcface() -> None:
    assert imported_models_of(job_models("inswapper_128", "")) == (
        "inswapper_128",
        "inswapper_128_fp32",
        "inswapper_128_source",
        "arcface_w600k_r50",
    )


def test_an_imported_detector_job_needs_the_detector_and_its_twin() -> None:
    assert imported_models_of(job_models("", "scrfd_2.5g")) == ("scrfd_2.5g", "scrfd_2.5g_fp32")

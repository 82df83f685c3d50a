from __future__ import annotations

import numpy as np

from services.worker.face_embedder import (
    PATTERN_BINS,
    descriptor_distance,
    face_descriptor,
    lbp_descriptor,
    uniform_lbp,
)
from tests.worker.face_photos import astronaut, astronaut_landmarks


def test_uniform_lbp_labels_flat_and_edge_patterns() -> None:
    flat = np.full((5, 5), 100, np.uint8)
    labels = uniform_lbp(flat)
    assert labels.shape == (3, 3)
    # Every neighbour >= centre: the all-ones code, a uniform pattern, the same everywhere.
    assert len(np.unique(labels)) == 1 and labels[0, 0] != PATTERN_BINS - 1
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    noisy = uniform_lbp(noise)
    assert noisy.min() >= 0 and noisy.max() == PATTERN_BINS - 1


def test_descriptor_is_unit_length_and_zero_distance_to_itself() -> None:
    descriptor = face_descriptor(astronaut(), astronaut_landmarks())
    assert descriptor.dtype == np.float32
    assert abs(float(np.linalg.norm(descriptor)) - 1.0) < 1e-5
    assert descriptor_distance(descriptor, descriptor) < 1e-6


def test_descriptor_changes_with_the_texture() -> None:
    image = np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)
    flipped = np.ascontiguousarray(image[::-1])
    assert descriptor_distance(lbp_descriptor(image), lbp_descriptor(flipped)) > 0.05

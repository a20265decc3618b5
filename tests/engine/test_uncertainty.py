"""Alignment uncertainty: the spread of the matching's estimate under shifted, jittered copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.engine.progress import CancelToken
from napari_unifuse.engine.uncertainty import (
    alignment_uncertainty,
    displacement_spread_mm,
    matching_estimator,
    matching_shift_voxels,
    perturbation_shifts,
    uncertainty_on_matching_level,
    uncertainty_threshold_mm,
)
from napari_unifuse.errors import Cancelled


def half_structured_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """Left half: sharp-edged blocks of random grey; right half: one flat grey region."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.uniform(0.2, 1.0, (size // 6, size // 12)), np.ones((6, 6)))
    image = np.full((size, size), 0.5, np.float32)
    image[:, : size // 2] = blocks
    return image


def test_uncertainty_is_higher_in_a_flat_region_than_at_sharp_edges():
    image = half_structured_image()
    tensor = torch.from_numpy(image)[None, None]
    estimate = matching_estimator(tensor, torch.zeros(1, 2, *image.shape), step=4)
    shift = matching_shift_voxels(4)
    spread = alignment_uncertainty(tensor, estimate, spacing=(1.5, 1.5), shift_voxels=shift, passes=4)
    edges = ndimage.gaussian_gradient_magnitude(image, 1.0) > 0.05
    structured = edges[:, 8:40]  # inside the left half, away from the border and the divide
    flat = spread[:, 64:88]
    assert spread.shape == image.shape
    assert np.median(flat) > 2 * np.median(spread[:, 8:40][structured])
    # An aligner blind to the shifts reads about one shift length (here in mm) where it is flat.
    assert np.median(flat) == pytest.approx(shift * 1.5, rel=0.25)
    assert np.median(flat) > uncertainty_threshold_mm((1.5, 1.5)) > np.median(spread[:, 8:40][structured])


def test_an_aligner_that_follows_every_shift_exactly_has_zero_spread():
    moving = torch.rand(1, 1, 12, 16, 16)
    base = np.zeros((3, 12, 16, 16), np.float32)
    shifts = iter([np.zeros(3), *perturbation_shifts(3, 3, 1.5)])
    spread = alignment_uncertainty(moving, lambda _: base - next(shifts).reshape(3, 1, 1, 1), (2.0, 1.0, 1.0),
                                   shift_voxels=1.5, passes=3)
    np.testing.assert_allclose(spread, 0.0, atol=1e-6)


def test_spread_is_a_vector_length_in_mm_with_the_spacing():
    fields = [np.zeros((2, 4, 4)), np.zeros((2, 4, 4))]
    fields[1][0] = 2.0  # two voxels along y, spacing 3 mm: the two samples are 6 mm apart
    np.testing.assert_allclose(displacement_spread_mm(fields, (3.0, 1.0)), 6.0 / np.sqrt(2))
    assert uncertainty_threshold_mm((3.0, 1.0)) == pytest.approx(2.0)


def test_shifts_come_in_opposite_pairs_along_y_then_x_then_z():
    shifts = perturbation_shifts(6, 3, 2.0)
    np.testing.assert_allclose(shifts, [[0, 2, 0], [0, -2, 0], [0, 0, 2], [0, 0, -2], [2, 0, 0], [-2, 0, 0]])


def test_a_cancelled_run_stops_between_passes():
    token = CancelToken()
    calls = []

    def estimate(moving):
        calls.append(1)
        token.cancel()
        return np.zeros((2, 8, 8), np.float32)

    with pytest.raises(Cancelled):
        alignment_uncertainty(torch.rand(1, 1, 8, 8), estimate, (1.0, 1.0), shift_voxels=1.0, passes=4, cancel=token)
    assert len(calls) == 1


def test_a_volume_beyond_the_matching_level_is_measured_pooled_and_returned_on_its_grid():
    """100³ voxels exceed the matching's level (about 96³): the spread is measured on the level
    pooled by 2 (threshold: one level voxel) and still tells the flat half from the structured one."""
    rng = np.random.default_rng(0)
    volume = np.full((100, 100, 100), 0.5, np.float32)
    volume[:, :, :50] = np.kron(rng.uniform(0.2, 1.0, (10, 10, 5)), np.ones((10, 10, 10)))
    tensor = torch.from_numpy(volume)[None, None]
    spread, threshold = uncertainty_on_matching_level(tensor, tensor, torch.zeros(1, 3, *volume.shape),
                                                      (1.0, 1.0, 1.0), step=4, passes=2)
    assert spread.shape == volume.shape
    assert threshold == pytest.approx(2.0)
    assert np.median(spread[20:80, 20:80, 70:90]) > threshold > np.median(spread[20:80, 20:80, 10:40])

"""Alignment uncertainty: the spread of the matching's estimate under shifted, jittered copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.engine import uncertainty
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
    shifts = iter([np.zeros(3), *perturbation_shifts(3, 3, 1.5, (1, 2))])
    spread = alignment_uncertainty(moving, lambda _: base - next(shifts).reshape(3, 1, 1, 1), (2.0, 1.0, 1.0),
                                   shift_voxels=1.5, passes=3)
    np.testing.assert_allclose(spread, 0.0, atol=1e-6)


def test_spread_is_a_vector_length_in_mm_with_the_spacing():
    fields = [np.zeros((2, 4, 4)), np.zeros((2, 4, 4))]
    fields[1][0] = 2.0  # two voxels along y, spacing 3 mm: the two samples are 6 mm apart
    np.testing.assert_allclose(displacement_spread_mm(fields, (3.0, 1.0)), 6.0 / np.sqrt(2))
    assert uncertainty_threshold_mm((3.0, 1.0)) == pytest.approx(2.0)


def test_shifts_come_in_opposite_pairs_along_the_in_plane_axes_then_through_the_plane():
    shifts = perturbation_shifts(6, 3, 2.0, (1, 2))
    np.testing.assert_allclose(shifts, [[0, 2, 0], [0, -2, 0], [0, 0, 2], [0, 0, -2], [2, 0, 0], [-2, 0, 0]])
    shifts = perturbation_shifts(6, 3, 2.0, (0, 1))
    np.testing.assert_allclose(shifts, [[2, 0, 0], [-2, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 2], [0, 0, -2]])


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 2, 0), (2, 0, 1)])
def test_the_spread_does_not_depend_on_which_axis_stores_the_thick_slices(order):
    """An aligner blind to every shift reads the shift's length in mm: 2 voxels of 1.5 mm in-plane,
    whichever array axis holds the 7.5 mm slices (not 7.5 mm shifts across them)."""
    spacing = np.array([7.5, 1.5, 1.5])[list(order)]
    shape = tuple(np.array([4, 10, 10])[list(order)])
    blind = np.zeros((3, *shape), np.float32)
    spread = alignment_uncertainty(torch.rand(1, 1, *shape), lambda _: blind, tuple(spacing), shift_voxels=2.0,
                                   passes=4)
    # Two opposite shifts of 3 mm along each in-plane axis among five samples: sqrt(2 · 18 / 4) mm.
    np.testing.assert_allclose(spread, 3.0, rtol=1e-6)


def test_the_shifts_follow_the_full_grid_spacing_not_the_pooled_level(monkeypatch):
    """(1, 1, 4) mm voxels are pooled to a level of 4 mm cubes, whose spacing no longer tells the
    thick axis; the shifts stay in the plane of the 1 mm axes."""
    calls = {}

    def record(moving, estimate, spacing, **options):
        calls.update(spacing=spacing, in_plane=options["in_plane"])
        return np.zeros(moving.shape[2:], np.float32)

    monkeypatch.setattr(uncertainty, "alignment_uncertainty", record)
    volume = torch.rand(1, 1, 64, 64, 16)
    uncertainty.uncertainty_on_matching_level(volume, volume, torch.zeros(1, 3, 64, 64, 16), (1.0, 1.0, 4.0), step=4)
    assert calls["spacing"] == pytest.approx((4.0, 4.0, 4.0))
    assert tuple(calls["in_plane"]) == (0, 1)


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


def test_the_definition_says_anisotropic_voxels_are_pooled_whatever_the_volumes_size():
    """0.5 × 0.5 × 4 mm voxels are matched on 4 mm level voxels at any size: the threshold of a
    12 × 48 × 48 volume, far below 96³, is 4 mm, not its 1.67 mm mean spacing; the definition said
    the level pools only volumes beyond about 96³."""
    volume = torch.from_numpy(np.random.default_rng(0).uniform(0.2, 1.0, (12, 48, 48)).astype(np.float32))[None, None]
    spread, threshold = uncertainty_on_matching_level(volume, volume, torch.zeros(1, 3, 12, 48, 48),
                                                      (4.0, 0.5, 0.5), step=4, passes=2)
    assert spread.shape == (12, 48, 48)
    assert threshold == pytest.approx(4.0)
    assert "fine axes of anisotropic voxels by powers of two towards the coarsest spacing" in uncertainty.DEFINITION
    assert "(0.5 × 0.5 × 4 mm voxels run at 4 × 4 × 4 mm)" in uncertainty.DEFINITION

"""A field estimated on a pooled grid (the matching's pyramid level, the local stage's cells)
comes back to the full grid with each pooled voxel at the centre of its pooling window,
factor·i + (factor − 1)/2, also where the factor does not divide the size (the last window is
cut short by ceil-mode pooling; the grid of centres stays regular)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_unifuse.engine import uncertainty
from napari_unifuse.model import matching

_SLOPE = 0.05  # a 5 % gradient: the field moves 0.05 voxels per voxel


def _linear(coordinates: torch.Tensor, size: int) -> torch.Tensor:
    """The test field along one axis, in full voxels, at full-grid ``coordinates``."""
    return _SLOPE * (coordinates - size / 2)


def _level_field(level_shape: tuple[int, ...], factors: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    """The linear field (1, ndim, *level_shape) sampled at the level voxels' centres, in level voxels."""
    axes = [torch.arange(n, dtype=torch.float32) * f + (f - 1) / 2 for n, f in zip(level_shape, factors)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([_linear(g, n) / f for g, n, f in zip(grids, spatial, factors)])[None]


def _full_field(spatial: tuple[int, ...]) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij")
    return torch.stack([_linear(g, n) for g, n in zip(grids, spatial)])[None]


def _between_first_and_last_centre(factors: tuple[int, ...]) -> tuple[slice, ...]:
    """Beyond the outermost centres the field is held at the border, as it always was (the sizes
    here put the last centre at or past the image's end, so only the start is cut)."""
    return (slice(None), slice(None), *(slice(math.ceil((f - 1) / 2), None) for f in factors))


def _match_pair_with_level_field(monkeypatch, spatial, spacing):
    factors = matching.pyramid_factors(spatial, spacing)
    level_shape = tuple(math.ceil(n / f) for n, f in zip(spatial, factors))
    level = _level_field(level_shape, factors, spatial)
    monkeypatch.setattr(matching, "_match_level", lambda moving, *args: level.clone())
    image = torch.zeros(1, 1, *spatial)
    full = matching._match_pair(image, image, 4, 8, 2.0, False, spacing, lambda: None)
    return full, level, factors


def test_a_level_of_a_size_the_factor_does_not_divide_comes_back_at_its_voxel_centres(monkeypatch):
    """8 × 200 × 200 at 26.9 × 1.075 × 1.075 mm pools in-plane by 16 to 13 level voxels (not 12.5):
    mapping by the ratio 200/13 instead of 16 misplaced a 5 % gradient by 0.19 voxels on average."""
    spatial = (8, 200, 200)
    full, _, factors = _match_pair_with_level_field(monkeypatch, spatial, (26.875, 1.075, 1.075))
    assert factors == (1, 16, 16) and full.shape == (1, 3, *spatial)
    inside = _between_first_and_last_centre(factors)
    error = (full - _full_field(spatial))[inside].abs()
    assert float(error.max()) < 1e-3


def test_a_level_the_factor_divides_comes_back_exactly_as_before(monkeypatch):
    spatial = (8, 208, 208)
    full, level, factors = _match_pair_with_level_field(monkeypatch, spatial, (26.875, 1.075, 1.075))
    assert factors == (1, 16, 16)
    scale = torch.tensor(factors, dtype=torch.float32).view(1, -1, 1, 1, 1)
    before = F.interpolate(level * scale, size=spatial, mode="trilinear", align_corners=False)
    assert torch.equal(full, before)


def test_the_local_stage_cells_come_back_at_their_centres_where_the_step_does_not_divide_the_size(monkeypatch):
    """The local stage matches on cells of half the step (4 voxels): a 50-voxel side holds 13 cells."""
    spatial, cell = (50, 50), 4
    grid = (13, 13)
    offsets = _level_field(grid, (cell, cell), spatial) * cell  # block_match returns full voxels
    monkeypatch.setattr(matching, "block_match", lambda *args: (offsets, torch.ones(1, 1, *grid)))
    monkeypatch.setattr(matching, "gaussian_blur", lambda x, sigma: x)
    image = torch.rand(1, 1, *spatial)
    local = matching.local_matching(image, image, 2 * cell, 2.0)
    # With every cell fully confident the normalised convolution keeps norm / (norm + 1e-3) of it.
    expected = _full_field(spatial) / (1 + 1e-3)
    inside = _between_first_and_last_centre((cell, cell))
    assert float((local - expected)[inside].abs().max()) < 1e-3


def test_the_uncertainty_map_comes_back_at_the_level_voxel_centres(monkeypatch):
    spatial, spacing = (8, 200, 200), (26.875, 1.075, 1.075)
    factors = matching.pyramid_factors(spatial, spacing)

    def level_map(moving, estimate, level_spacing, **options):
        return _level_field(tuple(moving.shape[2:]), factors, spatial)[0, 2].numpy() * factors[2]

    monkeypatch.setattr(uncertainty, "alignment_uncertainty", level_map)
    image = torch.zeros(1, 1, *spatial)
    spread, _ = uncertainty.uncertainty_on_matching_level(image, image, torch.zeros(1, 3, *spatial), spacing, step=4)
    inside = _between_first_and_last_centre(factors)[2:]
    expected = _full_field(spatial)[0, 2].numpy()
    assert spread.shape == spatial
    assert np.abs(spread - expected)[inside].max() == pytest.approx(0, abs=1e-3)

"""local_correlation() against a direct numpy loop and on known shifts; correlation_pyramid()
on shifts only its coarse level can see."""

import itertools

import numpy as np
import pytest
import torch

from napari_unifuse.model.correlation import correlation_pyramid, local_correlation, window_size


def _reference(a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """Per voxel and offset: cosine of the channel vectors, zero outside ``b``."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    spatial = a.shape[2:]
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(spatial)))
    out = np.zeros((a.shape[0], len(offsets), *spatial))
    for k, offset in enumerate(offsets):
        for x in np.ndindex(*spatial):
            y = tuple(xi + di for xi, di in zip(x, offset))
            if all(0 <= yi < size for yi, size in zip(y, spatial)):
                out[(slice(None), k, *x)] = (a[(..., *x)] * b[(..., *y)]).sum(axis=1)
    return out


@pytest.mark.parametrize(("shape", "radius"), [((7, 9), 2), ((4, 5, 6), 1)])
def test_matches_direct_loop(shape, radius):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 2, 3, *shape))
    result = local_correlation(torch.from_numpy(a), torch.from_numpy(b), radius)
    assert result.shape == (2, window_size(len(shape), radius), *shape)
    np.testing.assert_allclose(result.numpy(), _reference(a, b, radius), atol=1e-12)


@pytest.mark.parametrize("shift", [(2, -1), (-1, 0, 2)])
def test_best_match_channel_is_the_shift(shift):
    """b(x) = a(x - s): the feature of a(x) sits at x + s in b, so offset s scores 1."""
    radius = 2
    a = torch.randn(1, 8, *[12] * len(shift))
    b = torch.roll(a, shifts=shift, dims=tuple(range(2, 2 + len(shift))))
    # Away from the border, where x + s stays inside b (roll wraps, the window does not).
    interior = (..., *[slice(radius, -radius)] * len(shift))
    result = local_correlation(a, b, radius)[interior]
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(shift)))
    best = result.argmax(dim=1).flatten()
    assert {offsets[k] for k in best.tolist()} == {shift}
    torch.testing.assert_close(result.amax(dim=1), torch.ones_like(result[:, 0]))


def test_pyramid_level_one_finds_shifts_beyond_the_window():
    """A shift of 2·s voxels between maps that are piecewise constant on 2×2 blocks is a shift of
    s on the grid pooled by 2, so level 1 of the pyramid finds it, beyond level 0's reach (radius 1)."""
    radius, shift = 1, (1, -1)
    coarse = torch.randn(1, 8, 10, 10)
    a = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    b = torch.roll(a, shifts=tuple(2 * s for s in shift), dims=(2, 3))
    pyramid = correlation_pyramid(a, b, radius, levels=2)
    per_level = window_size(2, radius)
    assert pyramid.shape == (1, 2 * per_level, 20, 20)
    torch.testing.assert_close(pyramid[:, :per_level], local_correlation(a, b, radius))
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=2))
    interior = (..., slice(4, -4), slice(4, -4))
    best = pyramid[:, per_level:][interior].argmax(dim=1).flatten()
    assert {offsets[k] for k in best.tolist()} == {shift}

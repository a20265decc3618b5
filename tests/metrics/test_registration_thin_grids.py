"""Fields of grids one voxel thick along an axis (a 1×N or N×1 picture, which fuse accepts): their
Jacobian and regularity are those over the axes that have extent, never an error."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.overlays import field_jacobian
from napari_unifuse.errors import InputError
from napari_unifuse.metrics import (
    end_point_error,
    folding_percentage,
    jacobian_determinant,
    jacobian_regularity,
    sd_log_jacobian,
)


def _one_row_field(length=40, seed=3):
    """(2, 1, length): a field along x only, folding where its x component falls faster than 1/voxel."""
    rng = np.random.default_rng(seed)
    u = np.zeros((2, 1, length))
    u[0] = rng.uniform(-2, 2, (1, length))  # y moves: nothing varies along y's one voxel
    u[1] = np.cumsum(rng.uniform(-1.6, 0.8, length))[np.newaxis]
    return u


def test_a_one_row_fields_determinant_is_that_along_its_row():
    u = _one_row_field()
    along_row = 1.0 + np.gradient(u[1, 0])
    np.testing.assert_allclose(jacobian_determinant(u), along_row[np.newaxis])
    np.testing.assert_allclose(jacobian_determinant(u[::-1].transpose(0, 2, 1)), along_row[:, np.newaxis])
    assert (along_row <= 0).any() and (along_row > 0).any(), "the test field should fold in places"


def test_a_one_row_fields_regularity_is_learn2regs_over_the_row():
    u = _one_row_field()
    interior = (1.0 + np.gradient(u[1, 0]))[2:-2]
    expected_folding = 100.0 * np.mean(interior <= 0)
    expected_sd = np.log(np.clip(interior + 3.0, 1e-9, 1e9)).std()
    assert folding_percentage(u) == pytest.approx(expected_folding)
    assert sd_log_jacobian(u) == pytest.approx(expected_sd)
    regularity = jacobian_regularity(jacobian_determinant(u[::-1].transpose(0, 2, 1)))  # the N×1 picture
    assert regularity.folding_percentage == pytest.approx(expected_folding)
    assert regularity.sd_log_jacobian == pytest.approx(expected_sd)


def test_a_volume_one_voxel_thick_along_two_axes_has_the_determinant_along_its_line():
    rng = np.random.default_rng(4)
    u = np.zeros((3, 1, 1, 30))
    u[2, 0, 0] = np.cumsum(rng.uniform(-1.5, 1.0, 30))
    u[0] = rng.uniform(-1, 1, (1, 1, 30))
    np.testing.assert_allclose(jacobian_determinant(u)[0, 0], 1.0 + np.gradient(u[2, 0, 0]))


def test_the_review_maps_jacobian_of_a_one_row_picture():
    u = _one_row_field().astype(np.float32)
    np.testing.assert_allclose(field_jacobian(u), 1.0 + np.gradient(u[1, 0].astype(np.float64))[np.newaxis],
                               rtol=1e-6)


def test_end_point_error_on_a_one_row_grid():
    truth = np.zeros((2, 1, 8))
    assert end_point_error(np.full((2, 1, 8), 3.0), truth) == pytest.approx(np.hypot(3.0, 3.0))


def test_an_ill_shaped_field_is_still_refused_with_a_clear_message():
    with pytest.raises(InputError, match=r"shape \(ndim, \*spatial\)"):
        jacobian_determinant(np.zeros((3, 1, 8)))
    with pytest.raises(InputError, match="at least one voxel"):
        jacobian_determinant(np.zeros((2, 0, 8)))

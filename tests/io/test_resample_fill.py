"""What ``resample_to_reference`` puts where the moving image does not reach."""

from __future__ import annotations

import numpy as np

from napari_unifuse.io import Geometry, ImageVolume, resample_to_reference

GRID = Geometry(np.ones(2), np.zeros(2), np.eye(2))


def test_points_beyond_the_moving_image_take_the_fill_value_and_the_rest_is_unchanged():
    """A CT's air (-1000 HU), not 0 HU (water), beyond a CT that reaches 12 of the grid's 20 rows."""
    values = np.linspace(-1000, 1000, 12 * 16, dtype=np.float32).reshape(12, 16)
    grid = ImageVolume(np.zeros((20, 16), np.float32), GRID)
    filled = resample_to_reference(ImageVolume(values, GRID), grid, fill_value=-1000.0).array
    np.testing.assert_array_equal(filled[12:], -1000.0)
    np.testing.assert_array_equal(filled[:12], resample_to_reference(ImageVolume(values, GRID), grid).array[:12])
    np.testing.assert_array_equal(resample_to_reference(ImageVolume(values, GRID), grid).array[12:], 0.0)

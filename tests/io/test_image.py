"""io.image: ImageVolume helpers."""

import numpy as np
import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume


def test_on_grid_of_compares_shape_and_the_index_to_world_map():
    grid = Geometry(np.array([1.0, 1.0]), np.zeros(2), np.eye(2))
    image = ImageVolume(np.zeros((8, 8), np.float32), grid)
    assert image.on_grid_of(ImageVolume(np.ones((8, 8), np.float32), grid))
    assert not image.on_grid_of(ImageVolume(np.zeros((8, 9), np.float32), grid))
    shifted = Geometry(np.array([1.0, 1.0]), np.array([0.0, 5e-4]), np.eye(2))
    assert not image.on_grid_of(ImageVolume(np.zeros((8, 8), np.float32), shifted))
    assert image.on_grid_of(ImageVolume(np.zeros((8, 8), np.float32), shifted), atol=1e-3)


@pytest.mark.parametrize("origin, direction, named", [
    ((0.0, 0.0), np.eye(2), "origin has 2 and its direction is 2×2"),
    ((0.0, 0.0, 0.0), np.eye(2), "origin has 3 and its direction is 2×2"),
    ((0.0, 0.0), np.eye(3), "origin has 2 and its direction is 3×3"),
], ids=["2-d origin and direction", "2-d direction", "2-d origin"])
def test_a_geometry_of_mismatched_lengths_names_them(origin, direction, named):
    with pytest.raises(InputError, match=f"spacing has 3 values but its {named}: give 3 origin values and a 3×3"):
        Geometry(spacing=(1.0, 1.0, 1.0), origin=origin, direction=direction)

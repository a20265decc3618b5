"""io.image: ImageVolume helpers."""

import numpy as np

from napari_unifuse.io import Geometry, ImageVolume


def test_on_grid_of_compares_shape_and_the_index_to_world_map():
    grid = Geometry(np.array([1.0, 1.0]), np.zeros(2), np.eye(2))
    image = ImageVolume(np.zeros((8, 8), np.float32), grid)
    assert image.on_grid_of(ImageVolume(np.ones((8, 8), np.float32), grid))
    assert not image.on_grid_of(ImageVolume(np.zeros((8, 9), np.float32), grid))
    shifted = Geometry(np.array([1.0, 1.0]), np.array([0.0, 5e-4]), np.eye(2))
    assert not image.on_grid_of(ImageVolume(np.zeros((8, 8), np.float32), shifted))
    assert image.on_grid_of(ImageVolume(np.zeros((8, 8), np.float32), shifted), atol=1e-3)

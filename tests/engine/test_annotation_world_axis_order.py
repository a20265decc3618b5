"""slice_in_world_axis_order: a slice of a volume as stored, named on the grid of its world-axis-order copy."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.engine.annotations import slice_in_world_axis_order
from napari_unifuse.io import Geometry, ImageVolume

# Array axes (y, z, x) of a coronal series whose rows run head to foot; an axial grid; a sagittal one (x, z, y).
CORONAL_HEAD_TO_FOOT = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
SAGITTAL = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
AXIAL_HEAD_TO_FOOT = np.diag([-1.0, 1.0, 1.0])


@pytest.mark.parametrize("direction", [np.eye(3), AXIAL_HEAD_TO_FOOT, CORONAL_HEAD_TO_FOOT, SAGITTAL])
def test_each_stored_slice_is_the_same_voxels_on_the_world_axis_order_grid(direction):
    shape = (5, 6, 7)
    volume = ImageVolume(np.arange(np.prod(shape)).reshape(shape),
                         Geometry(np.array([2.0, 1.5, 1.0]), np.array([3.0, -4.0, 5.0]), direction))
    reoriented = volume.in_world_axis_order()
    for axis in range(3):
        for index in range(shape[axis]):
            new_axis, new_index = slice_in_world_axis_order(volume, axis, index)
            stored = np.sort(np.take(volume.array, index, axis=axis), axis=None)
            np.testing.assert_array_equal(np.sort(np.take(reoriented.array, new_index, axis=new_axis), axis=None),
                                          stored)


def test_a_2d_image_keeps_its_slice():
    volume = ImageVolume(np.zeros((4, 5)), Geometry(np.ones(2), np.zeros(2), np.diag([-1.0, 1.0])))
    assert slice_in_world_axis_order(volume, 0, 0) == (0, 0)

"""Fields of grids one voxel thick along their first array axis (ITK's last, which ITK's NIfTI reader
drops): a 2-D picture one row tall, a volume one voxel thick along two axes. They round-trip through
write_displacement / read_displacement and SimpleITK reads them as fields that move the same points."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from napari_unifuse.io import Geometry, read_displacement, write_displacement

_CASES = {
    "2d-one-row": ((1, 40), [0.7, 1.6], (30.0,)),
    "2d-one-column": ((40, 1), [0.7, 1.6], (30.0,)),
    "3d-one-line-along-x": ((1, 1, 12), [2.5, 0.9, 1.3], (10.0, -20.0, 35.0)),
    "3d-one-line-along-y": ((1, 12, 1), [2.5, 0.9, 1.3], (10.0, -20.0, 35.0)),
}


@pytest.mark.parametrize(("shape", "spacing", "degrees"), list(_CASES.values()), ids=list(_CASES))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_thin_grids_field_round_trips_and_simpleitk_moves_its_points_as_u_says(
        tmp_path, rng, rotation, shape, spacing, degrees, suffix):
    ndim = len(shape)
    geometry = Geometry(spacing, rng.uniform(-50, 50, ndim), rotation(degrees))
    u = rng.uniform(-3, 3, (ndim, *shape)).astype(np.float32)
    path = write_displacement(u, geometry, tmp_path / f"displacement{suffix}")

    np.testing.assert_allclose(read_displacement(path, geometry, shape), u, atol=1e-4)

    field = sitk.ReadImage(str(path))
    assert field.GetDimension() == ndim
    assert field.GetNumberOfComponentsPerPixel() == ndim
    assert sorted(field.GetSize()) == sorted(shape)
    assert sorted(field.GetSpacing()) == pytest.approx(sorted(spacing))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    index_to_world = geometry.index_to_world
    for index in np.ndindex(*shape):
        point = index_to_world @ [*index, 1.0]
        expected = index_to_world @ [*(np.array(index) + u[(slice(None), *index)]), 1.0]
        # ITK's x, y, z are the array axes reversed.
        moved = transform.TransformPoint(tuple(point[:ndim][::-1]))
        np.testing.assert_allclose(moved[::-1], expected[:ndim], atol=1e-3)

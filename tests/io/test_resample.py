"""resample_to_reference works in physical space: structures land where the world says;
grid_coverage says how much of the reference it reaches; resample_to_spacing makes coarser copies
that average what they cannot hold."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.io import Geometry, ImageVolume, grid_coverage, resample_to_reference, resample_to_spacing


def _world_points(geometry: Geometry, shape) -> np.ndarray:
    """World position of every voxel, shape (*shape, ndim)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ geometry.index_to_world[:-1, :-1].T + geometry.origin


def test_blob_lands_on_the_reference_voxel_of_its_world_position(rotation):
    reference = ImageVolume(np.zeros((12, 20, 18), np.float32), Geometry([3.0, 1.0, 1.25], [-10.0, 5.0, 0.0], np.eye(3)))
    moving_shape = (45, 40, 60)  # other extent, other spacing, oblique
    # The blob's centre is the world position of reference voxel (5, 11, 7), as SimpleITK sees it.
    target = (5, 11, 7)
    centre = np.array(reference.to_sitk().TransformIndexToPhysicalPoint(target[::-1]))[::-1]
    # Place the moving grid so that the centre falls inside it, between its voxels.
    direction, spacing = rotation((10.0, -15.0, 25.0)), np.array([1.0, 1.5, 0.8])
    origin = centre - (direction * spacing) @ np.array([20.3, 17.6, 31.2])
    moving_geometry = Geometry(spacing, origin, direction)

    def blob(points):
        return np.exp(-((points - centre) ** 2).sum(-1) / (2 * 2.0**2)).astype(np.float32)

    moving = ImageVolume(blob(_world_points(moving_geometry, moving_shape)), moving_geometry, source="moving.nii.gz")

    resampled = resample_to_reference(moving, reference)
    assert resampled.array.shape == reference.array.shape and resampled.array.dtype == np.float32
    np.testing.assert_array_equal(resampled.geometry.index_to_world, reference.geometry.index_to_world)
    assert np.unravel_index(np.argmax(resampled.array), resampled.array.shape) == target
    # Linear interpolation of a 2 mm Gaussian sampled every 0.8-1.5 mm: within 0.15 of exact.
    np.testing.assert_allclose(resampled.array, blob(_world_points(reference.geometry, reference.array.shape)), atol=0.15)
    assert resampled.source == moving.source  # writers still refuse to overwrite the moving file


def test_nearest_keeps_labels_and_outside_is_zero():
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 3
    moving = ImageVolume(labels, Geometry([2.0, 2.0, 2.0], [0.0, 0.0, 0.0], np.eye(3)))
    # Finer grid shifted half-way out of the moving volume.
    reference = ImageVolume(np.zeros((10, 10, 10), np.float32), Geometry([1.0, 1.0, 1.0], [8.0, 8.0, 8.0], np.eye(3)))
    resampled = resample_to_reference(moving, reference, interpolation="nearest")
    assert resampled.array.dtype == np.uint8
    assert set(np.unique(resampled.array)) == {0, 3}
    assert resampled.array[0, 0, 0] == 3  # world (8, 8, 8) = moving index (4, 4, 4)
    assert resampled.array[-1, -1, -1] == 0  # world (17, 17, 17) lies outside the moving volume


def test_dimension_mismatch_is_an_input_error():
    flat = ImageVolume(np.zeros((4, 4)), Geometry.identity(2), source="slice.png")
    with pytest.raises(InputError, match="2D image onto a 3D reference"):
        resample_to_reference(flat, ImageVolume(np.zeros((4, 4, 4)), Geometry.identity(3)))


def test_a_dimension_mismatch_names_the_reference_only_when_it_has_a_source():
    """An in-memory reference (a napari layer) has no source: the message ended in "(None)"."""
    flat = ImageVolume(np.zeros((4, 4)), Geometry.identity(2), source="slice.png")
    volume = np.zeros((4, 4, 4))
    with pytest.raises(InputError) as in_memory:
        resample_to_reference(flat, ImageVolume(volume, Geometry.identity(3)))
    assert str(in_memory.value) == "slice.png: cannot resample a 2D image onto a 3D reference"
    with pytest.raises(InputError) as from_file:
        resample_to_reference(flat, ImageVolume(volume, Geometry.identity(3), source="t1.nii.gz"))
    assert str(from_file.value) == "slice.png: cannot resample a 2D image onto a 3D reference (t1.nii.gz)"


def test_a_coarser_copy_keeps_the_extent_and_averages_what_it_cannot_hold(rotation):
    direction = rotation((0.0, 20.0, -10.0))
    geometry = Geometry(np.array([1.0, 1.0, 4.0]), np.array([3.0, -2.0, 7.0]), direction)
    # Stripes of period 2 voxels along axis 0 (finer than the copy can hold) over a ramp along axis 1.
    stripes = (np.arange(56) % 2).astype(np.float32)[:, None, None]
    ramp = np.linspace(0.0, 1.0, 42, dtype=np.float32)[None, :, None]
    volume = ImageVolume(np.broadcast_to(stripes + ramp, (56, 42, 10)).copy(), geometry)
    copy = resample_to_spacing(volume, 2.8)
    assert copy.spatial_shape == (20, 15, 10)  # 56 and 42 mm at 2.8 mm; the 4 mm axis is already coarser
    np.testing.assert_allclose(copy.geometry.spacing, [2.8, 2.8, 4.0])
    np.testing.assert_allclose(copy.geometry.origin, geometry.origin)
    np.testing.assert_allclose(copy.geometry.direction, direction)
    inner = copy.array[2:-2, 2:-2]
    # The stripes average to their mean (no aliased pattern survives); the ramp is kept.
    assert np.ptp(inner.mean(axis=(1, 2))) < 0.02
    copy_rows = np.arange(2, 13) * 2.8  # their positions along axis 1, in the original's voxels
    np.testing.assert_allclose(inner[..., 5].mean(axis=0), 0.5 + copy_rows / 41.0, atol=0.03)
    with pytest.raises(InputError, match="positive"):
        resample_to_spacing(volume, 0.0)


@pytest.mark.parametrize("angles, shift", [((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), ((10.0, -15.0, 25.0), (4.0, -6.0, 3.0)),
                                           ((0.0, 30.0, 0.0), (9.0, 0.0, 0.0)), ((0.0, 0.0, 0.0), (0.0, 0.0, 300.0))])
def test_grid_coverage_is_the_share_of_the_reference_a_resampled_image_reaches(rotation, angles, shift):
    """The coverage is exactly the share of reference voxels where a resampled all-ones image is not
    the outside value 0."""
    reference = ImageVolume(np.zeros((12, 20, 18), np.float32), Geometry([3.0, 1.0, 1.25], [-10.0, 5.0, 0.0], np.eye(3)))
    moving = ImageVolume(np.ones((15, 16, 14), np.float32),
                         Geometry([2.0, 1.1, 0.9], np.array([-8.0, 7.0, 3.0]) + shift, rotation(angles)))
    reached = np.mean(resample_to_reference(moving, reference).array > 0)
    assert grid_coverage(moving, reference) == pytest.approx(reached, abs=1e-12)
    assert (reached == 0) == (shift[2] == 300.0)


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (0.0, 20.0, 0.0)], ids=["aligned", "oblique"])
def test_grid_coverage_counts_every_voxel_of_a_grid_larger_than_32_per_axis(rotation, angles):
    """A lattice of 32 samples per axis read a 53 % overlap as 50 % and warned of under half."""
    reference = ImageVolume(np.zeros((45, 70, 64), np.float32), Geometry([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], np.eye(3)))
    moving = ImageVolume(np.ones((30, 60, 50), np.float32), Geometry([1.2, 1.1, 1.0], [21.3, 4.0, 7.0], rotation(angles)))
    reached = np.mean(resample_to_reference(moving, reference).array > 0)
    assert 0.2 < reached < 0.8
    assert grid_coverage(moving, reference) == pytest.approx(reached, abs=1e-12)


def test_an_8_bit_colour_image_resamples_to_unit_floats_as_the_package_holds_colour():
    """0-255 floats read as out-of-range colour: a PET label's luma came out clipped to a mask."""
    colour = np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    image = ImageVolume(colour, Geometry.identity(2), is_rgb=True)
    same_grid = resample_to_reference(image, ImageVolume(np.zeros((12, 10), np.float32), Geometry.identity(2)))
    assert same_grid.array.dtype == np.float32 and same_grid.is_rgb
    np.testing.assert_allclose(same_grid.array, colour / 255.0, atol=1e-6)
    nearest = resample_to_reference(image, same_grid, interpolation="nearest")
    np.testing.assert_array_equal(nearest.array, colour)  # nearest keeps the pixel type, as for labels
